import EdgeKeyMQTT
import EdgeKeyTestSupport
import Foundation
import Testing

func message(_ i: Int, size: Int = 0, expires: Date? = nil) -> OutboxMessage {
  OutboxMessage(
    id: 0, topic: "t/\(i)", payload: Array(repeating: UInt8(i & 0xff), count: size), qos: .atLeastOnce, retain: false,
    created: Date(), expires: expires)
}

/// A value shared by test threads.
final class Locked<Value>: @unchecked Sendable {
  // @unchecked: `value` is used under `lock`.
  private let lock = NSLock()
  private var value: Value
  init(_ value: Value) { self.value = value }
  func withLock<R>(_ body: (inout Value) -> R) -> R {
    lock.lock()
    defer { lock.unlock() }
    return body(&value)
  }
}

/// True for the first caller of `raiseOnce()` only.
final class Flag: @unchecked Sendable {
  private let raised = Locked(false)
  func raiseOnce() -> Bool {
    raised.withLock { r in
      defer { r = true }
      return !r
    }
  }
}

@Suite("The outbox: order, bounds, expiry, durability (SQLite WAL and in memory)")
struct MQTTOutboxTests {
  static let kinds = ["sqlite", "memory"]

  func make(_ kind: String, limits: OutboxLimits = OutboxLimits()) throws -> Outbox {
    kind == "memory" ? Outbox.memory(limits: limits) : try Outbox(path: temporaryPath("outbox.db"), limits: limits)
  }

  @Test("messages come out in the order they went in, and removed ones stay removed", arguments: kinds)
  func order(_ kind: String) throws {
    let outbox = try make(kind)
    let stored = try outbox.append((0..<10).map { message($0) }).stored
    #expect(stored.map(\.id) == stored.map(\.id).sorted())
    try outbox.remove([stored[0].id, stored[3].id])
    let next = try outbox.next(after: 0, limit: 100).messages
    #expect(next.map(\.topic) == ["t/1", "t/2", "t/4", "t/5", "t/6", "t/7", "t/8", "t/9"])
    #expect(try outbox.next(after: stored[5].id, limit: 2).messages.map(\.topic) == ["t/6", "t/7"])
    #expect(outbox.count == 8)
    #expect(outbox.bytes == 8 * 3)
  }

  @Test("a full outbox refuses new messages and keeps what it has", arguments: kinds)
  func refuseNew(_ kind: String) throws {
    let outbox = try make(kind, limits: OutboxLimits(maximumMessages: 3, whenFull: .refuseNew))
    try outbox.append([message(1), message(2), message(3)])
    let error = #expect(throws: MQTTError.self) { try outbox.append([message(4)]) }
    #expect(error?.kind == .outboxFull)
    #expect(try outbox.next(after: 0, limit: 10).messages.map(\.topic) == ["t/1", "t/2", "t/3"])
  }

  @Test("a full outbox under dropOldest drops the oldest, by count and by bytes", arguments: kinds)
  func dropOldest(_ kind: String) throws {
    let outbox = try make(kind, limits: OutboxLimits(maximumMessages: 3, maximumBytes: 608, whenFull: .dropOldest))
    let first = try outbox.append([message(1), message(2), message(3)]).stored
    let result = try outbox.append([message(4)])
    #expect(result.dropped == [first[0].id])
    #expect(try outbox.next(after: 0, limit: 10).messages.map(\.topic) == ["t/2", "t/3", "t/4"])
    // 603 bytes more: one message for the count, but two for the bytes (9 + 603 - 608 = 4 > 3).
    let big = try outbox.append([message(5, size: 600)])
    #expect(big.dropped.count == 2)
    #expect(try outbox.next(after: 0, limit: 10).messages.map(\.topic) == ["t/4", "t/5"])
    #expect(outbox.bytes == 3 + 603)
    let tooBig = #expect(throws: MQTTError.self) { try outbox.append([message(6, size: 2000)]) }
    #expect(tooBig?.kind == .outboxFull)
  }

  @Test("expired messages are removed instead of returned", arguments: kinds)
  func expiry(_ kind: String) throws {
    let outbox = try make(kind)
    let past = Date().addingTimeInterval(-1)
    let stored = try outbox.append([message(1), message(2, expires: past), message(3, expires: Date() + 3600)]).stored
    let next = try outbox.next(after: 0, limit: 10)
    #expect(next.messages.map(\.topic) == ["t/1", "t/3"])
    #expect(next.expired == [stored[1].id])
    #expect(outbox.count == 2)
  }

  @Test("the database is WAL, 0600, reopened with its messages and ids, and refuses a second user")
  func persistence() throws {
    let path = temporaryPath("outbox.db")
    var ids: [Int64] = []
    do {
      let outbox = try Outbox(path: path)
      ids = try outbox.append((0..<5).map { message($0, size: 10) }).stored.map(\.id)
      try outbox.remove([ids[0]])
      let second = #expect(throws: MQTTError.self) { _ = try Outbox(path: path) }
      #expect(second?.kind == .outbox)
    }
    let attributes = try FileManager.default.attributesOfItem(atPath: path)
    #expect((attributes[.posixPermissions] as? Int) == 0o600)
    let reopened = try Outbox(path: path)
    #expect(reopened.count == 4)
    #expect(reopened.bytes == 4 * (3 + 10))
    let next = try reopened.next(after: 0, limit: 10).messages
    #expect(next.map(\.id) == Array(ids.dropFirst()))
    #expect(next.first?.payload == Array(repeating: 1, count: 10))
    // New ids keep increasing after a reopen (AUTOINCREMENT), so the order holds.
    let more = try reopened.append([message(9)]).stored
    #expect(more[0].id > ids.last!)
  }

  @Test("a damaged database is reported, not silently replaced")
  func damaged() throws {
    let path = temporaryPath("outbox.db")
    try FileManager.default.createDirectory(
      atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    try Data("this is not an SQLite database, it is what a torn write could leave".utf8).write(
      to: URL(fileURLWithPath: path))
    let error = #expect(throws: MQTTError.self) { _ = try Outbox(path: path) }
    #expect(error?.kind == .outbox)
    #expect(try String(contentsOfFile: path, encoding: .utf8).hasPrefix("this is not"))
  }

  /// Runs `body(i)` on `n` threads at once and waits for all of them.
  private func onThreads(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let done = DispatchSemaphore(value: 0)
    for i in 0..<n {
      Thread.detachNewThread {
        body(i)
        done.signal()
      }
    }
    for _ in 0..<n { done.wait() }
  }

  /// Holds the first commit until `waiting` other appends are pending, so that the next commit
  /// must gather them (without it, whether appends overlap is up to the scheduler).
  private func holdFirstCommit(of outbox: Outbox, until waiting: Int) {
    let first = Flag()
    // Weak: the outbox keeps the hook, and the hook must not keep the outbox.
    outbox.onCommit { [weak outbox] _ in
      guard first.raiseOnce(), let outbox else { return }
      let deadline = ContinuousClock.now + .seconds(60)
      while outbox.pendingCount < waiting && ContinuousClock.now < deadline { usleep(1000) }
    }
  }

  @Test("group commit: appends that arrive during a commit are committed together, in one transaction")
  func groupCommit() throws {
    let path = temporaryPath("group.db")
    let ids = Locked<[Int: Int64]>([:])
    do {
      let outbox = try Outbox(path: path)
      holdFirstCommit(of: outbox, until: 15)
      onThreads(16) { i in
        let stored = try? outbox.append([message(i)])
        if let id = stored?.stored.first?.id { ids.withLock { $0[i] = id } }
      }
      #expect(outbox.commitCount == 2, "the first append alone, then the fifteen that waited for it, together")
    }  // closed here, so that the file can be opened again
    let all = ids.withLock { $0 }
    #expect(all.count == 16 && Set(all.values).count == 16, "every caller got its own id: \(all)")
    // Durable: what each caller was told is stored is in the file.
    let reopened = try Outbox(path: path)
    let (messages, _) = try reopened.next(after: 0, limit: 100)
    #expect(messages.count == 16)
    for m in messages { #expect(all[Int(m.topic.dropFirst(2))!] == m.id, "\(m.topic) has the id its caller got") }
  }

  @Test("group commit at the limit: a group that does not fit is taken one by one, refusing exactly what is over")
  func groupCommitAtTheLimit() throws {
    let outbox = try Outbox(path: temporaryPath("group-full.db"), limits: OutboxLimits(maximumMessages: 10))
    holdFirstCommit(of: outbox, until: 15)
    let refused = Locked(0)
    onThreads(16) { i in
      do {
        try outbox.append([message(i)])
      } catch {
        if (error as? MQTTError)?.kind == .outboxFull { refused.withLock { $0 += 1 } }
      }
    }
    #expect(outbox.count == 10)
    #expect(refused.withLock { $0 } == 6)
  }

  @Test("while a commit holds the store, removals and reads of committed messages go on without waiting for it")
  func nothingWaitsForACommit() throws {
    let path = temporaryPath("no-wait.db")
    do {
      let outbox = try Outbox(path: path)
      let first = try outbox.append((0..<4).map { message($0) }).stored
      // A connection has the first two.
      #expect(try outbox.next(after: 0, limit: 2).messages.map(\.id) == first.prefix(2).map(\.id))
      let holding = Locked(false)
      let held = DispatchSemaphore(value: 0)
      let release = DispatchSemaphore(value: 0)
      outbox.onCommit { _ in
        holding.withLock { $0 = true }
        held.signal()
        _ = release.wait(timeout: .now() + 30)
        holding.withLock { $0 = false }
      }
      let appended = DispatchSemaphore(value: 0)
      Thread.detachNewThread {
        _ = try? outbox.append([message(9)])
        appended.signal()
      }
      held.wait()  // the commit of message 9 holds the store (as an fsync would) until released
      try outbox.remove([first[0].id, first[1].id])
      let next = try outbox.next(after: first[1].id, limit: 10).messages
      #expect(holding.withLock { $0 }, "remove and next returned while the commit still held the store")
      #expect(next.map(\.topic) == ["t/2", "t/3"])
      release.signal()
      appended.wait()
      outbox.onCommit(nil)
      #expect(outbox.removalsNotStored == 0, "the commit stored the removals noted while it ran")
      #expect(outbox.count == 3)
      #expect(try outbox.next(after: first[3].id, limit: 10).messages.map(\.topic) == ["t/9"])
      // With no commit running, a removal is stored at once.
      try outbox.remove([first[2].id])
      #expect(outbox.removalsNotStored == 0)
    }
    let reopened = try Outbox(path: path)
    #expect(try reopened.next(after: 0, limit: 10).messages.map(\.topic) == ["t/3", "t/9"])
  }

  @Test("more than the memory keeps: reads below what it holds come from the store, in order", arguments: kinds)
  func pastTheTail(_ kind: String) throws {
    let outbox = try make(kind)
    let n = 5000  // above the 4096 messages kept in memory
    let stored = try outbox.append((0..<n).map { message($0) }).stored
    try outbox.remove([stored[10].id, stored[n - 10].id])
    var seen: [Int64] = []
    var after: Int64 = 0
    while true {
      let batch = try outbox.next(after: after, limit: 700).messages
      guard let last = batch.last else { break }
      seen += batch.map(\.id)
      after = last.id
    }
    let expected = stored.map(\.id).filter { $0 != stored[10].id && $0 != stored[n - 10].id }
    #expect(seen == expected)
    // A new connection starts again from the beginning, and the store has everything.
    #expect(try outbox.next(after: 0, limit: n).messages.map(\.id) == expected)
  }

  @Test("the reconnect policy: full jitter within a growing bound, long waits after refusals")
  func reconnectPolicy() {
    let p = ReconnectPolicy(
      initialDelay: .seconds(1), maximumDelay: .seconds(60), refusedInitialDelay: .seconds(300),
      refusedMaximumDelay: .seconds(3600))
    #expect(p.bound(failures: 1, refused: false) == .seconds(1))
    #expect(p.bound(failures: 4, refused: false) == .seconds(8))
    #expect(p.bound(failures: 50, refused: false) == .seconds(60))
    #expect(p.delay(failures: 3, refused: false, random: 0) == .zero)
    #expect(p.delay(failures: 3, refused: false, random: 0.5) == .seconds(2))
    #expect(p.delay(failures: 1, refused: true, random: 0) == .seconds(150))
    #expect(p.bound(failures: 10, refused: true) == .seconds(3600))
    let samples = (0..<1000).map { _ in p.delay(failures: 5, refused: false, random: Double.random(in: 0..<1)) }
    #expect(samples.allSatisfy { $0 >= .zero && $0 < .seconds(16) })
    #expect(Set(samples.map { Int($0.seconds) }).count > 10, "the delays are spread, not synchronized")
  }

  @Test("metrics render as OpenMetrics text")
  func openMetrics() {
    var m = MQTTMetrics()
    m.messagesQueued = 3
    m.messagesDropped = ["expired": 1]
    m.handshakeFailures = ["untrustedRoot": 2]
    m.certificateExpiresIn = .seconds(86400)
    let text = m.openMetrics(labels: ["device": "device-\"1\""])
    #expect(text.contains("# TYPE edgekey_mqtt_messages_queued counter\n"))
    #expect(text.contains("edgekey_mqtt_messages_queued_total{device=\"device-\\\"1\\\"\"} 3\n"))
    #expect(text.contains("edgekey_mqtt_messages_dropped_total{device=\"device-\\\"1\\\"\",reason=\"expired\"} 1\n"))
    #expect(text.contains("edgekey_mqtt_certificate_expiry_seconds{device=\"device-\\\"1\\\"\"} 86400\n"))
    #expect(text.hasSuffix("# EOF\n"))
  }
}
