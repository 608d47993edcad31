import EdgeKeyCore
import FoundationEssentials

/// A message waiting in the outbox: accepted from the application, not yet acknowledged by the
/// broker.
public struct OutboxMessage: Sendable, Equatable {
  /// Assigned by the outbox; increases with every message, so it is also the delivery order.
  public var id: Int64
  /// The topic.
  public var topic: String
  /// The payload.
  public var payload: [UInt8]
  /// QoS 1 or 2 (QoS 0 is never stored).
  public var qos: MQTTQoS
  /// The retain flag.
  public var retain: Bool
  /// When it was accepted.
  public var created: Date
  /// After this the message is dropped (and counted) instead of sent.
  public var expires: Date?

  /// A stored message; `id` is the outbox's (0 before it is stored).
  public init(
    id: Int64 = 0, topic: String, payload: [UInt8], qos: MQTTQoS = .atLeastOnce, retain: Bool = false,
    created: Date = Date(), expires: Date? = nil
  ) {
    self.id = id
    self.topic = topic
    self.payload = payload
    self.qos = qos
    self.retain = retain
    self.created = created
    self.expires = expires
  }

  var size: Int { topic.utf8.count + payload.count }
}

/// How large the outbox may grow, and what happens when it is full.
public struct OutboxLimits: Sendable, Equatable {
  /// What a full outbox does with a new message.
  public enum WhenFull: Sendable, Equatable {
    /// New messages are refused with `MQTTError.Kind.outboxFull`; nothing stored is lost.
    case refuseNew
    /// The oldest messages are dropped (and counted) to make room for the new one.
    case dropOldest
  }
  /// The most messages stored at once.
  public var maximumMessages: Int
  /// The most topic and payload bytes stored at once.
  public var maximumBytes: Int
  /// What happens beyond either limit.
  public var whenFull: WhenFull

  /// Limits of `maximumMessages` and `maximumBytes`.
  public init(maximumMessages: Int = 100_000, maximumBytes: Int = 64 << 20, whenFull: WhenFull = .refuseNew) {
    self.maximumMessages = maximumMessages
    self.maximumBytes = maximumBytes
    self.whenFull = whenFull
  }
}

/// What a power cut may cost.
public enum OutboxDurability: Sendable, Equatable {
  /// Every accepted message is on stable storage before `publish`/`enqueue` returns
  /// (SQLite WAL, `synchronous=FULL`: one fsync of the write-ahead log per commit; appends that
  /// arrive while a commit runs are committed together, with one fsync, by the next).
  case powerSafe
  /// Accepted messages survive the process being killed; a power cut may take the last ones
  /// back (never corrupts the file). SQLite WAL, `synchronous=NORMAL`: no fsync per append.
  case processSafe
}

/// Store-and-forward for QoS 1 and 2 messages: kept until the broker acknowledges them,
/// delivered in the order they were accepted.
///
/// On disk it is one SQLite database in WAL mode. SQLite is chosen over a hand-made journal
/// because its WAL commit is atomic and checksummed (a torn write at a power cut is detected
/// and rolled back, not replayed as garbage), deletions of acknowledged messages and the
/// size bound are one indexed statement each, and Debian ships it (libsqlite3). Removal of
/// acknowledged messages is committed without an fsync of its own: a power cut can at worst
/// deliver an acknowledged message again (at-least-once), never lose one.
///
/// Group commit: appends from several threads at once are not committed one after another.
/// While one commit runs, the appends that arrive wait together, and the next commit stores
/// them all in one transaction (one fsync); each caller returns once its own messages are
/// durable, and the order of acceptance is kept.
///
/// `Outbox.memory()` keeps the same rules in memory, for messages that need not survive a
/// restart.
///
/// The network thread never waits for a commit: the messages committed and not yet handed out
/// are also kept in memory (up to 4096 messages or 4 MiB), and `next` serves them from there;
/// removals of acknowledged messages are noted at once and stored by the next transaction (the
/// next commit's, or one of their own as soon as no commit runs).
public final class Outbox: @unchecked Sendable {
  // @unchecked: the store and the caches are used under `lock`; `pending`, `committing`,
  // `commits` and `commitHook` under `commit`; `tail`, `tailBytes`, `tailFloor` and `removals`
  // under `quick`, which is never held across a store call.
  /// How large it may grow.
  public let limits: OutboxLimits
  /// The database file, or nil for an in-memory outbox.
  public let path: String?
  /// Whether a commit waits for the disk (an fsync): `.powerSafe` on a file. Then a commit takes
  /// milliseconds and async callers make it on EdgeKey's own threads; otherwise microseconds,
  /// made on the caller's.
  package let commitsWaitForTheDisk: Bool
  private let lock = Lock()
  private let store: any OutboxStorage
  private var countCache = 0
  private var bytesCache = 0
  private let commit = Condition()
  private var pending: [AppendRequest] = []
  private var committing = false
  /// A drain job (committing asynchronous appends) is scheduled or running.
  private var draining = false
  private var commits = 0
  private var commitHook: (@Sendable (Int) -> Void)?
  private let quick = Lock()
  /// Committed messages with ids above `tailFloor`, in order: every stored message above the
  /// floor is here (until it is handed out past, or removed).
  private var tail: [OutboxMessage] = []
  private var tailBytes = 0
  private var tailFloor: Int64 = 0
  /// Ids removed but not yet deleted from the store.
  private var removals: [Int64] = []
  static let tailLimit = (messages: 4096, bytes: 4 << 20)

  /// One caller's append, waiting for a commit.
  private final class AppendRequest {
    let messages: [OutboxMessage]
    let size: Int
    let whileLocked: ([OutboxMessage]) -> Void
    /// For an asynchronous append: called with the result once it is committed.
    let done: ((AppendResult) -> Void)?
    var result: AppendResult?
    init(
      _ messages: [OutboxMessage], size: Int, whileLocked: @escaping ([OutboxMessage]) -> Void,
      done: ((AppendResult) -> Void)? = nil
    ) {
      self.messages = messages
      self.size = size
      self.whileLocked = whileLocked
      self.done = done
    }
  }

  /// What an append gives: the stored messages and those dropped to make room.
  package typealias AppendResult = Result<(stored: [OutboxMessage], dropped: [Int64]), MQTTError>

  /// An outbox in the SQLite database at `path` (created 0600, in a directory created 0700).
  public init(path: String, limits: OutboxLimits = OutboxLimits(), durability: OutboxDurability = .powerSafe)
    throws(MQTTError)
  {
    self.limits = limits
    self.path = path
    commitsWaitForTheDisk = durability == .powerSafe
    let db = try SQLiteOutboxStorage(path: path, durability: durability)
    store = db
    (countCache, bytesCache) = try db.totals()
    tailFloor = try db.lastID()
  }

  private init(memoryWith limits: OutboxLimits) {
    self.limits = limits
    path = nil
    commitsWaitForTheDisk = false
    store = MemoryOutboxStorage()
  }

  /// An outbox that lives only as long as the process.
  public static func memory(limits: OutboxLimits = OutboxLimits()) -> Outbox { Outbox(memoryWith: limits) }

  deinit {
    lock.lock()
    _ = flushRemovalsLocked()
    lock.unlock()
  }

  private func locked<R>(_ body: () throws(MQTTError) -> R) throws(MQTTError) -> R {
    lock.lock()
    defer { unlockFlushing() }
    return try body()
  }

  /// Releases `lock`, storing first the removals noted while it was held. A removal noted by a
  /// thread that found `lock` taken is stored by the holder here, so none waits for a later
  /// transaction that may never come.
  private func unlockFlushing() {
    while flushRemovalsLocked() == nil {
      lock.unlock()
      guard quick.withLock({ !removals.isEmpty }), lock.tryLock() else { return }
    }
    lock.unlock()
  }

  /// Deletes the noted removals from the store (under `lock`); on failure they stay noted.
  private func flushRemovalsLocked() -> MQTTError? {
    let ids = takeRemovals()
    guard !ids.isEmpty else { return nil }
    do {
      let removed = try store.remove(ids, durable: false)
      countCache -= removed.count
      bytesCache -= removed.size
      return nil
    } catch {
      restoreRemovals(ids)
      return error
    }
  }

  private func takeRemovals() -> [Int64] {
    quick.withLock {
      defer { removals = [] }
      return removals
    }
  }

  private func restoreRemovals(_ ids: [Int64]) {
    quick.withLock { removals.insert(contentsOf: ids, at: 0) }
  }

  /// Appends to the store (under `lock`), deleting the noted removals in the same transaction.
  private func storeAppending(_ messages: [OutboxMessage]) throws(MQTTError) -> [OutboxMessage] {
    let ids = takeRemovals()
    do {
      let result = try store.append(messages, removing: ids)
      countCache -= result.removed.count
      bytesCache -= result.removed.size
      return result.stored
    } catch {
      restoreRemovals(ids)
      throw error
    }
  }

  /// Makes committed messages visible to `next` (under `lock`, after their waiters are registered).
  private func addToTail(_ stored: [OutboxMessage]) {
    quick.withLock {
      tail.append(contentsOf: stored)
      tailBytes += stored.reduce(0) { $0 + $1.size }
      var drop = 0
      var dropBytes = 0
      while drop < tail.count
        && (tail.count - drop > Self.tailLimit.messages || tailBytes - dropBytes > Self.tailLimit.bytes)
      {
        dropBytes += tail[drop].size
        drop += 1
      }
      if drop > 0 {
        tailFloor = tail[drop - 1].id
        tail.removeFirst(drop)
        tailBytes -= dropBytes
      }
    }
  }

  /// Forgets removed messages in the tail (under `quick`).
  private func dropFromTailQuick(_ ids: [Int64]) {
    guard let first = tail.first?.id, let last = ids.max(), last >= first else { return }
    let gone = Set(ids)
    tail.removeAll { m in
      guard gone.contains(m.id) else { return false }
      tailBytes -= m.size
      return true
    }
  }

  /// Messages waiting (accepted, not acknowledged).
  public var count: Int {
    lock.lock()
    _ = flushRemovalsLocked()
    defer { unlockFlushing() }
    return countCache
  }
  /// Their topics and payloads, in bytes.
  public var bytes: Int {
    lock.lock()
    _ = flushRemovalsLocked()
    defer { unlockFlushing() }
    return bytesCache
  }

  /// Appends in order. Returns the stored messages and those dropped (oldest first) to make
  /// room under `.dropOldest`. Under `.refuseNew` a batch that does not fit is refused whole.
  @discardableResult
  public func append(_ messages: [OutboxMessage]) throws(MQTTError) -> (stored: [OutboxMessage], dropped: [Int64]) {
    try append(messages, whileLocked: { _ in })
  }

  /// `whileLocked` runs before anyone else can read the stored messages (the client registers
  /// its waiters there, so that no acknowledgement can come before them).
  func append(_ messages: [OutboxMessage], whileLocked: @escaping ([OutboxMessage]) -> Void) throws(MQTTError) -> (
    stored: [OutboxMessage], dropped: [Int64]
  ) {
    guard !messages.isEmpty else { return ([], []) }
    let size = try checkedSize(messages)
    let request = AppendRequest(messages, size: size, whileLocked: whileLocked)
    commit.lock()
    pending.append(request)
    // The first caller to find no commit running commits everything pending; the others wait
    // for it, and whoever is still pending after it commits next.
    while request.result == nil {
      if committing {
        commit.wait()
        continue
      }
      commitPendingLocked()
    }
    commit.unlock()
    return try request.result!.get()
  }

  /// Appends without waiting: `done` gets the result once the messages are committed (on the
  /// thread that commits them; it must not wait). The commits run on EdgeKey's own threads, one
  /// after another while appends keep coming, each storing every append that arrived while the
  /// previous one ran: so a caller's thread never blocks, and the only thread that waits for the
  /// disk is the one committing.
  package func append(
    _ messages: [OutboxMessage], whileLocked: @escaping ([OutboxMessage]) -> Void,
    done: @escaping @Sendable (AppendResult) -> Void
  ) {
    guard !messages.isEmpty else { return done(.success(([], []))) }
    let size: Int
    do {
      size = try checkedSize(messages)
    } catch {
      return done(.failure(error))
    }
    commit.lock()
    pending.append(AppendRequest(messages, size: size, whileLocked: whileLocked, done: done))
    let start = !committing && !draining
    if start { draining = true }
    commit.unlock()
    if start { BlockingPool.shared.execute { self.drain() } }
  }

  /// Commits until nothing is pending (a running commit's holder leaves the rest here).
  private func drain() {
    commit.lock()
    while !pending.isEmpty {
      if committing {
        commit.wait()
        continue
      }
      commitPendingLocked()
    }
    draining = false
    commit.unlock()
  }

  /// Commits everything pending (called and returning with `commit` held, which it lets go
  /// during the commit). Asynchronous appends that arrive meanwhile are left for a drain job.
  private func commitPendingLocked() {
    committing = true
    let group = pending
    pending = []
    commits += 1
    let hook = commitHook
    commit.unlock()
    let results = commitGroup(group, hook: hook)
    for (r, result) in zip(group, results) { r.done?(result) }
    commit.lock()
    // Results are handed over under `commit`, where the waiters read them.
    for (r, result) in zip(group, results) { r.result = result }
    committing = false
    commit.broadcast()
    if !draining, pending.contains(where: { $0.done != nil }) {
      draining = true
      BlockingPool.shared.execute { self.drain() }
    }
  }

  private func checkedSize(_ messages: [OutboxMessage]) throws(MQTTError) -> Int {
    let size = messages.reduce(0) { $0 + $1.size }
    if messages.count > limits.maximumMessages || size > limits.maximumBytes {
      throw MQTTError(
        kind: .outboxFull,
        reason: "\(messages.count) message(s) of \(size) bytes exceed the outbox's limits on their own")
    }
    return size
  }

  /// Commits (stored in the order of `group`) every request of `group`: in one transaction when
  /// together they fit the limits, else one by one (a full outbox refuses or makes room per
  /// request, as for a caller alone).
  private func commitGroup(_ group: [AppendRequest], hook: (@Sendable (Int) -> Void)?) -> [Result<
    (stored: [OutboxMessage], dropped: [Int64]), MQTTError
  >] {
    lock.lock()
    defer { unlockFlushing() }
    hook?(group.count)
    let count = group.reduce(0) { $0 + $1.messages.count }
    let size = group.reduce(0) { $0 + $1.size }
    guard group.count > 1, countCache + count <= limits.maximumMessages, bytesCache + size <= limits.maximumBytes
    else {
      return group.map { r in
        Result { () throws(MQTTError) in try appendLocked(r.messages, size: r.size, whileLocked: r.whileLocked) }
      }
    }
    let stored: [OutboxMessage]
    do {
      stored = try storeAppending(group.flatMap(\.messages))
    } catch {
      return group.map { _ in .failure(error) }
    }
    countCache += stored.count
    bytesCache += size
    var results: [Result<(stored: [OutboxMessage], dropped: [Int64]), MQTTError>] = []
    var start = 0
    for r in group {
      let part = Array(stored[start..<start + r.messages.count])
      start += r.messages.count
      r.whileLocked(part)
      results.append(.success((part, [])))
    }
    addToTail(stored)
    return results
  }

  /// One append under `lock`: the limits, room made under `.dropOldest`, one transaction.
  private func appendLocked(_ messages: [OutboxMessage], size: Int, whileLocked: ([OutboxMessage]) -> Void)
    throws(MQTTError) -> (stored: [OutboxMessage], dropped: [Int64])
  {
    var dropped: [Int64] = []
    var overCount = countCache + messages.count - limits.maximumMessages
    var overBytes = bytesCache + size - limits.maximumBytes
    if overCount > 0 || overBytes > 0 {
      // Acknowledged messages not yet deleted make room first (and are never dropped as oldest).
      if let failure = flushRemovalsLocked() { throw failure }
      overCount = countCache + messages.count - limits.maximumMessages
      overBytes = bytesCache + size - limits.maximumBytes
    }
    if overCount > 0 || overBytes > 0 {
      guard limits.whenFull == .dropOldest else {
        throw MQTTError(
          kind: .outboxFull,
          reason:
            "the outbox is full (\(countCache) messages, \(bytesCache) bytes; limits \(limits.maximumMessages), "
            + "\(limits.maximumBytes)): the message was refused")
      }
      let victims = try store.oldest(freeing: max(overCount, 0), bytes: max(overBytes, 0))
      try store.remove(victims.map(\.id), durable: true)
      countCache -= victims.count
      bytesCache -= victims.reduce(0) { $0 + $1.size }
      dropped = victims.map(\.id)
      quick.withLock { dropFromTailQuick(dropped) }
    }
    let stored = try storeAppending(messages)
    countCache += stored.count
    bytesCache += size
    whileLocked(stored)
    addToTail(stored)
    return (stored, dropped)
  }

  /// Commits made so far (each one transaction; one fsync under `.powerSafe`).
  package var commitCount: Int {
    commit.lock()
    defer { commit.unlock() }
    return commits
  }

  /// Called by each committing caller, before its commit and holding the store as the commit
  /// does, with the number of appends in it (tests hold a commit there to see the next one gather
  /// the appends that arrive meanwhile, and `remove` and `next` go on without waiting).
  package func onCommit(_ hook: (@Sendable (Int) -> Void)?) {
    commit.lock()
    commitHook = hook
    commit.unlock()
  }

  /// Removals noted and not yet deleted from the store.
  package var removalsNotStored: Int { quick.withLock { removals.count } }

  /// Appends waiting for a commit.
  package var pendingCount: Int {
    commit.lock()
    defer { commit.unlock() }
    return pending.count
  }

  /// Up to `limit` messages with ids above `id`, in order. Expired ones are removed instead
  /// and returned in `expired`.
  public func next(after id: Int64, limit: Int, now: Date = Date()) throws(MQTTError) -> (
    messages: [OutboxMessage], expired: [Int64]
  ) {
    if let recent = fromTail(after: id, limit: limit, now: now) {
      if !recent.expired.isEmpty, lock.tryLock() {
        _ = flushRemovalsLocked()
        unlockFlushing()
      }
      return recent
    }
    return try locked { () throws(MQTTError) -> ([OutboxMessage], [Int64]) in
      if let failure = flushRemovalsLocked() { throw failure }
      var found: [OutboxMessage] = []
      var expired: [OutboxMessage] = []
      var after = id
      while found.count < limit {
        let batch = try store.next(after: after, limit: limit - found.count)
        if batch.isEmpty { break }
        for m in batch {
          if let e = m.expires, e <= now { expired.append(m) } else { found.append(m) }
        }
        after = batch.last!.id
      }
      if !expired.isEmpty {
        try store.remove(expired.map(\.id), durable: false)
        countCache -= expired.count
        bytesCache -= expired.reduce(0) { $0 + $1.size }
        quick.withLock { dropFromTailQuick(expired.map(\.id)) }
      }
      return (found, expired.map(\.id))
    }
  }

  /// `next` from memory, when every stored message above `id` is in the tail; nil otherwise.
  /// Messages at or below `id` leave the tail: the caller has them, and a new connection starts
  /// again from the store.
  private func fromTail(after id: Int64, limit: Int, now: Date) -> (messages: [OutboxMessage], expired: [Int64])? {
    quick.lock()
    defer { quick.unlock() }
    guard id >= tailFloor else { return nil }
    var handed = 0
    var handedBytes = 0
    while handed < tail.count && tail[handed].id <= id {
      handedBytes += tail[handed].size
      handed += 1
    }
    tail.removeFirst(handed)
    tailBytes -= handedBytes
    tailFloor = id
    var found: [OutboxMessage] = []
    var expired: [Int64] = []
    for m in tail {
      if found.count >= limit { break }
      if let e = m.expires, e <= now { expired.append(m.id) } else { found.append(m) }
    }
    if !expired.isEmpty {
      removals.append(contentsOf: expired)
      dropFromTailQuick(expired)
    }
    return (found, expired)
  }

  /// Forgets acknowledged messages (ids not present are ignored).
  ///
  /// Never waits for a commit: the ids are noted at once and deleted by the running commit's
  /// holder when it finishes, or here when none runs. `count`, `bytes` and `next` see them gone.
  public func remove(_ ids: [Int64]) throws(MQTTError) {
    guard !ids.isEmpty else { return }
    quick.withLock {
      removals.append(contentsOf: ids)
      dropFromTailQuick(ids)
    }
    guard lock.tryLock() else { return }
    let failure = flushRemovalsLocked()
    unlockFlushing()
    if let failure { throw failure }
  }
}

/// The storage behind an `Outbox`; called under the outbox's lock.
protocol OutboxStorage: AnyObject {
  /// Deletes `ids` and appends `messages` in one transaction.
  func append(_ messages: [OutboxMessage], removing ids: [Int64]) throws(MQTTError) -> (
    stored: [OutboxMessage], removed: (count: Int, size: Int)
  )
  func next(after id: Int64, limit: Int) throws(MQTTError) -> [OutboxMessage]
  /// The oldest messages that together free at least `count` messages and `bytes` bytes.
  func oldest(freeing count: Int, bytes: Int) throws(MQTTError) -> [OutboxMessage]
  /// Returns how many messages and bytes were removed.
  @discardableResult
  func remove(_ ids: [Int64], durable: Bool) throws(MQTTError) -> (count: Int, size: Int)
}

final class MemoryOutboxStorage: OutboxStorage {
  private var messages: [Int64: OutboxMessage] = [:]
  private var order: [Int64] = []  // increasing; may hold removed ids until compacted
  private var lastID: Int64 = 0

  func append(_ batch: [OutboxMessage], removing ids: [Int64]) -> (
    stored: [OutboxMessage], removed: (count: Int, size: Int)
  ) {
    let removed = remove(ids, durable: true)
    let stored = batch.map { m in
      var m = m
      lastID += 1
      m.id = lastID
      messages[m.id] = m
      order.append(m.id)
      return m
    }
    return (stored, removed)
  }

  func next(after id: Int64, limit: Int) -> [OutboxMessage] {
    var lo = 0
    var hi = order.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if order[mid] <= id { lo = mid + 1 } else { hi = mid }
    }
    var found: [OutboxMessage] = []
    while lo < order.count && found.count < limit {
      if let m = messages[order[lo]] { found.append(m) }
      lo += 1
    }
    return found
  }

  func oldest(freeing count: Int, bytes: Int) -> [OutboxMessage] {
    var found: [OutboxMessage] = []
    var freed = 0
    for id in order where found.count < count || freed < bytes {
      guard let m = messages[id] else { continue }
      found.append(m)
      freed += m.size
    }
    return found
  }

  func remove(_ ids: [Int64], durable: Bool) -> (count: Int, size: Int) {
    var count = 0
    var size = 0
    for id in ids {
      if let m = messages.removeValue(forKey: id) {
        count += 1
        size += m.size
      }
    }
    if order.count > 64 && order.count > 2 * messages.count { order.removeAll { messages[$0] == nil } }
    if messages.isEmpty { order.removeAll(keepingCapacity: true) }
    return (count, size)
  }
}
