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
public final class Outbox: @unchecked Sendable {
  // @unchecked: the store and the caches are used under `lock`; `pending`, `committing`,
  // `commits` and `commitHook` under `commit`.
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
  private var commits = 0
  private var commitHook: (@Sendable (Int) -> Void)?

  /// One caller's append, waiting for a commit.
  private final class AppendRequest {
    let messages: [OutboxMessage]
    let size: Int
    let whileLocked: ([OutboxMessage]) -> Void
    var result: Result<(stored: [OutboxMessage], dropped: [Int64]), MQTTError>?
    init(_ messages: [OutboxMessage], size: Int, whileLocked: @escaping ([OutboxMessage]) -> Void) {
      self.messages = messages
      self.size = size
      self.whileLocked = whileLocked
    }
  }

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
  }

  private init(memoryWith limits: OutboxLimits) {
    self.limits = limits
    path = nil
    commitsWaitForTheDisk = false
    store = MemoryOutboxStorage()
  }

  /// An outbox that lives only as long as the process.
  public static func memory(limits: OutboxLimits = OutboxLimits()) -> Outbox { Outbox(memoryWith: limits) }

  private func locked<R>(_ body: () throws(MQTTError) -> R) throws(MQTTError) -> R {
    lock.lock()
    defer { lock.unlock() }
    return try body()
  }

  /// Messages waiting (accepted, not acknowledged).
  public var count: Int { lock.withLock { countCache } }
  /// Their topics and payloads, in bytes.
  public var bytes: Int { lock.withLock { bytesCache } }

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
    let size = messages.reduce(0) { $0 + $1.size }
    if messages.count > limits.maximumMessages || size > limits.maximumBytes {
      throw MQTTError(
        kind: .outboxFull,
        reason: "\(messages.count) message(s) of \(size) bytes exceed the outbox's limits on their own")
    }
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
      committing = true
      let group = pending
      pending = []
      commits += 1
      let hook = commitHook
      commit.unlock()
      hook?(group.count)
      let results = commitGroup(group)
      commit.lock()
      // Results are handed over under `commit`, where the waiters read them.
      for (r, result) in zip(group, results) { r.result = result }
      committing = false
      commit.broadcast()
    }
    commit.unlock()
    return try request.result!.get()
  }

  /// Commits (stored in the order of `group`) every request of `group`: in one transaction when
  /// together they fit the limits, else one by one (a full outbox refuses or makes room per
  /// request, as for a caller alone).
  private func commitGroup(_ group: [AppendRequest]) -> [Result<(stored: [OutboxMessage], dropped: [Int64]), MQTTError>]
  {
    lock.lock()
    defer { lock.unlock() }
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
      stored = try store.append(group.flatMap(\.messages))
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
    return results
  }

  /// One append under `lock`: the limits, room made under `.dropOldest`, one transaction.
  private func appendLocked(_ messages: [OutboxMessage], size: Int, whileLocked: ([OutboxMessage]) -> Void)
    throws(MQTTError) -> (stored: [OutboxMessage], dropped: [Int64])
  {
    var dropped: [Int64] = []
    let overCount = countCache + messages.count - limits.maximumMessages
    let overBytes = bytesCache + size - limits.maximumBytes
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
    }
    let stored = try store.append(messages)
    countCache += stored.count
    bytesCache += size
    whileLocked(stored)
    return (stored, dropped)
  }

  /// Commits made so far (each one transaction; one fsync under `.powerSafe`).
  package var commitCount: Int {
    commit.lock()
    defer { commit.unlock() }
    return commits
  }

  /// Called by each committing caller, before its commit, with the number of appends in it
  /// (tests hold a commit there to see the next one gather the appends that arrive meanwhile).
  package func onCommit(_ hook: (@Sendable (Int) -> Void)?) {
    commit.lock()
    commitHook = hook
    commit.unlock()
  }

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
    try locked { () throws(MQTTError) -> ([OutboxMessage], [Int64]) in
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
      }
      return (found, expired.map(\.id))
    }
  }

  /// Forgets acknowledged messages (ids not present are ignored).
  public func remove(_ ids: [Int64]) throws(MQTTError) {
    guard !ids.isEmpty else { return }
    try locked { () throws(MQTTError) in
      let removed = try store.remove(ids, durable: false)
      countCache -= removed.count
      bytesCache -= removed.size
    }
  }
}

/// The storage behind an `Outbox`; called under the outbox's lock.
protocol OutboxStorage: AnyObject {
  func append(_ messages: [OutboxMessage]) throws(MQTTError) -> [OutboxMessage]
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

  func append(_ batch: [OutboxMessage]) -> [OutboxMessage] {
    batch.map { m in
      var m = m
      lastID += 1
      m.id = lastID
      messages[m.id] = m
      order.append(m.id)
      return m
    }
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
