internal import CMosquitto
import Dispatch
import EdgeKeyCore
import EdgeKeyTLS
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// An MQTT client over libmosquitto, authenticated by mutual TLS with a TPM-held key, that
/// never loses a message it accepted.
///
/// - The `TLSClientContext`'s `SSL_CTX` is handed to libmosquitto (`MOSQ_OPT_SSL_CTX`, defaults
///   off): the key is never reloaded per connect, and the host name is verified through the
///   context's verify parameters.
/// - QoS 1 and 2 messages go into the `Outbox` first (on disk when it has a path) and leave it
///   only when the broker has acknowledged them, in order, across reconnects and restarts.
///   QoS 0 messages are never stored: offline, they are refused with `.notConnected`.
/// - One network thread, owned by the client, makes every libmosquitto call (its documented
///   external-loop API: `mosquitto_socket`, `loop_read`, `loop_write`, `loop_misc`); the
///   other methods only queue work for it and wake it. A new libmosquitto handle is made for
///   every connection, with the TLS identity current at that moment, so a reconnect can never
///   keep an old context.
/// - Reconnects by `ReconnectPolicy` (full jitter, a long wait after a refusal), trying the
///   endpoints in turn.
public final class MQTTClient: Sendable {
  /// The brokers, session and reconnect policy this client was made with.
  public let configuration: MQTTConfiguration
  /// Where accepted QoS 1 and 2 messages wait for their acknowledgement.
  public let outbox: Outbox
  /// Messages on our subscriptions, in arrival order. A consumer that falls behind by
  /// `configuration.receiveBuffer` messages loses the oldest (counted in `metrics`).
  public let messages: AsyncStream<MQTTMessage>
  /// Every change of `state`, in order; a consumer that does not keep up sees the latest 64.
  public let stateChanges: AsyncStream<MQTTConnectionState>
  private let engine: Engine

  /// - Parameter outbox: where QoS ≥ 1 messages wait; `Outbox.memory()` when nil.
  public init(
    _ configuration: MQTTConfiguration, tls: TLSClientContext, outbox: Outbox? = nil, logger: Logger = .disabled
  ) throws(MQTTError) {
    guard !configuration.endpoints.isEmpty else {
      throw MQTTError(kind: .invalidArgument, reason: "no broker endpoint configured")
    }
    // libmosquitto refuses anything else, at connect time, as "invalid function arguments".
    let keepAlive = configuration.keepAlive.components
    guard keepAlive.attoseconds == 0, keepAlive.seconds == 0 || (5...65535).contains(keepAlive.seconds) else {
      throw MQTTError(
        kind: .invalidArgument,
        reason: "keepAlive \(configuration.keepAlive.secondsText): zero (off) or 5 to 65535 whole seconds")
    }
    try configuration.checkConnectProperties()
    self.configuration = configuration
    self.outbox = outbox ?? Outbox.memory()
    guard configuration.receiveBuffer > 0 else {
      throw MQTTError(kind: .invalidArgument, reason: "receiveBuffer \(configuration.receiveBuffer): at least 1")
    }
    let (messages, messageSink) = AsyncStream.makeStream(
      of: MQTTMessage.self, bufferingPolicy: .bufferingNewest(configuration.receiveBuffer))
    // The last 64 changes: a client nobody watches, reconnecting for weeks, keeps no backlog.
    let (states, stateSink) = AsyncStream.makeStream(
      of: MQTTConnectionState.self, bufferingPolicy: .bufferingNewest(64))
    self.messages = messages
    self.stateChanges = states
    engine = try Engine(
      configuration: configuration, tls: tls, outbox: self.outbox, messageSink: messageSink, stateSink: stateSink,
      logger: logger.labeled("edgekey.mqtt"))
  }

  deinit { engine.stop() }

  /// The TLS identity the next connection uses.
  public var tls: TLSClientContext { engine.currentTLS }
  /// What the broker's last CONNACK granted: session present, limits, the client id in use.
  /// Nil before the first connection.
  public var connack: MQTTConnack? { engine.withShared { $0.connack } }
  /// Whether the last connection's TLS writes cannot raise SIGPIPE (for the tests).
  package var writesWithoutSIGPIPE: Bool { engine.withShared { $0.writesWithoutSIGPIPE } }
  /// Where the connection stands now.
  public var state: MQTTConnectionState { engine.state }
  /// True while the broker has accepted us and the connection is up.
  public var isConnected: Bool {
    if case .connected = state { return true }
    return false
  }
  /// A snapshot of the counters.
  public var metrics: MQTTMetrics { engine.metricsSnapshot() }
  /// The MQTT version of the current (or last) connection: 5 or 3.1.1 (with `.automatic`, what
  /// the broker turned out to speak); nil before the first connection.
  public var protocolVersionInUse: MQTTProtocolVersion? { engine.withShared { $0.versionInUse } }
  /// The last failed attempt or lost connection (kept after a later success).
  public var lastFailure: MQTTFailure? { engine.withShared { $0.lastFailureRecord } }

  /// Starts connecting in the background (and reconnecting, until `stop()`); returns at once.
  public func start() { engine.start() }

  /// Starts, and waits until the broker has accepted us. Throws the first failed attempt's
  /// error (`TLSError` with its layer, or `MQTTError`); the client keeps retrying in the
  /// background by its `ReconnectPolicy` until `stop()`.
  public func connect(timeout: Duration = .seconds(15)) async throws {
    try await engine.connect(timeout: timeout)
  }

  /// Accepts a message. QoS 1 and 2: stored in the outbox, then returns once the broker has
  /// acknowledged it (PUBACK / PUBCOMP). QoS 0: sent if connected, else `.notConnected`.
  /// - Parameter expiry: how long after acceptance an unsent message is dropped (and counted);
  ///   also sent as the MQTT 5 message expiry interval. The deadline is stored with the message,
  ///   as a wall-clock moment, so that it survives a restart.
  public func publish(
    topic: String, payload: [UInt8], qos: MQTTQoS = .atLeastOnce, retain: Bool = false, expiry: Duration? = nil
  ) async throws {
    let message = MQTTMessage(topic: topic, payload: payload, qos: qos, retain: retain)
    if qos == .atMostOnce {
      try engine.sendAtMostOnce(message)
      return
    }
    try await engine.publishAndWait(message, expiry: expiry)
  }

  /// Accepts messages into the outbox in one transaction and returns their outbox ids at once;
  /// delivery happens in the background. (`waitUntilDelivered` waits for the outbox to drain.)
  ///
  /// Async callers get this overload: a transaction that waits for the disk (`.powerSafe`: an
  /// fsync, shared with the appends that arrive meanwhile) runs on a thread of EdgeKey's own,
  /// not on the cooperative pool; one that does not (in memory, `.processSafe`: microseconds)
  /// runs at once.
  @discardableResult
  public func enqueue(_ messages: [MQTTMessage], expiry: Duration? = nil) async throws(MQTTError) -> [Int64] {
    try await engine.enqueueAsync(messages, expiry: expiry)
  }

  /// Accepts messages into the outbox, as the async `enqueue` does, on the calling thread.
  @discardableResult
  public func enqueue(_ messages: [MQTTMessage], expiry: Duration? = nil) throws(MQTTError) -> [Int64] {
    try engine.enqueue(messages, expiry: expiry)
  }

  /// Waits until the outbox is empty (every accepted message acknowledged or dropped).
  public func waitUntilDelivered(timeout: Duration = .seconds(30)) async throws {
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: timeout)
    while outbox.count > 0 {
      if clock.now >= deadline {
        var reason = "\(outbox.count) message(s) still unacknowledged after \(timeout.secondsText)"
        // What kept them: the connection's last failure, with its layer, when not connected.
        if !isConnected, let failure = lastFailure {
          reason += "; not connected: \(failure.description)"
        }
        throw MQTTError(kind: .timedOut, reason: reason)
      }
      try await Task.sleep(nanoseconds: 5_000_000)
    }
  }

  /// Subscribes (now if connected, else on connecting) and after every reconnect; returns the
  /// QoS the broker granted.
  @discardableResult
  public func subscribe(_ filter: String, qos: MQTTQoS = .atLeastOnce) async throws -> MQTTQoS {
    try await engine.subscribe(filter, qos: qos)
  }

  /// Unsubscribes, and no longer subscribes after a reconnect.
  public func unsubscribe(_ filter: String) { engine.unsubscribe(filter) }

  /// Uses `tls` from the next connection on (certificate renewal, key rotation). With
  /// `reconnect`, the current connection is closed cleanly at once and a new one made; queued
  /// and unacknowledged messages stay in the outbox and go out on the new connection.
  public func replaceCredentials(_ tls: TLSClientContext, reconnect: Bool = true) {
    engine.replaceCredentials(tls, reconnect: reconnect)
  }

  /// Disconnects cleanly and stops the network thread. Unacknowledged messages stay in the
  /// outbox. Waiting calls fail with `.stopped`.
  public func stop() { engine.stop() }

  /// Stops as `stop()` does, waiting for the network thread on a thread of EdgeKey's own.
  public func stop() async {
    let engine = engine
    await BlockingPool.shared.run { engine.stop() }
  }

  /// The same as `stop()`.
  public func disconnect() { engine.stop() }

  /// The counters as OpenMetrics text.
  public func openMetrics(labels: [String: String] = [:]) -> String { metrics.openMetrics(labels: labels) }
}

/// What one connection ended with.
enum ConnectionOutcome {
  case stopped
  /// The credentials were replaced; reconnect now.
  case swapped
  /// Never got to CONNACK success.
  case failed(any Error, refused: Bool, reason: String)
  /// Was up for `upFor`.
  case lost(reason: String, upFor: Duration)
}

/// The client's state and its network thread.
final class Engine: @unchecked Sendable {
  // @unchecked: the members in `Shared` are used under `lock`; `wakeDescriptor` is immutable; the
  // network thread alone uses the libmosquitto handle (in `Connection`).
  let configuration: MQTTConfiguration
  let outbox: Outbox
  let messageSink: AsyncStream<MQTTMessage>.Continuation
  let stateSink: AsyncStream<MQTTConnectionState>.Continuation
  let clientID: String
  let logger: Logger
  /// A pipe that wakes the network thread: it polls the read end.
  let wakeDescriptor: Int32
  private let wakeWriter: Int32
  /// Outbox ids handed to the network at least once, not yet acknowledged (to count resends).
  /// The network thread's alone.
  var handedBefore = Set<Int64>()
  private let lock = Lock()
  private var shared: Shared
  private let finished = DispatchSemaphore(value: 0)

  struct Shared {
    var tls: TLSClientContext
    var swapRequested = false
    var stopping = false
    var started = false
    var state = MQTTConnectionState.idle
    var connectWaiters: [UUID: CheckedContinuation<Void, any Error>] = [:]
    var publishWaiters: [Int64: CheckedContinuation<Void, any Error>] = [:]
    /// Desired subscriptions, in the order they were made.
    var subscriptions: [(filter: String, qos: MQTTQoS)] = []
    var pendingSubscribes: [String] = []
    var pendingUnsubscribes: [String] = []
    var subscribeWaiters: [String: [CheckedContinuation<MQTTQoS, any Error>]] = [:]
    var atMostOnce: [MQTTMessage] = []
    /// Set when the outbox may hold messages the network thread has not fetched.
    var outboxChanged = true
    var metrics = MQTTMetrics()
    /// The error of the last failed attempt, until a connection succeeds.
    var lastFailure: (any Error)?
    var versionInUse: MQTTProtocolVersion?
    var lastFailureRecord: MQTTFailure?
    /// The last CONNACK's grant; its client id is the next connection's.
    var connack: MQTTConnack?
    /// The last connection's TLS writes go through EdgeKey's MSG_NOSIGNAL socket BIO.
    var writesWithoutSIGPIPE = false
  }

  /// The client id the next connection sends: the one the broker assigned, once it did.
  var nextClientID: String {
    withShared { s in s.connack.flatMap { $0.assignedClientID ? $0.clientID : nil } } ?? clientID
  }

  private static let libraryInit: Void = { mosquitto_lib_init() }()

  init(
    configuration: MQTTConfiguration, tls: TLSClientContext, outbox: Outbox,
    messageSink: AsyncStream<MQTTMessage>.Continuation, stateSink: AsyncStream<MQTTConnectionState>.Continuation,
    logger: Logger
  ) throws(MQTTError) {
    Engine.libraryInit
    self.logger = logger
    self.configuration = configuration
    self.outbox = outbox
    self.messageSink = messageSink
    self.stateSink = stateSink
    clientID = configuration.clientID ?? tls.certificateChain.first?.commonName ?? "edgekey"
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else {
      throw MQTTError(kind: .invalidArgument, reason: "pipe: \(String(cString: strerror(errno)))")
    }
    for fd in fds {
      _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
      _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
    }
    wakeDescriptor = fds[0]
    wakeWriter = fds[1]
    shared = Shared(tls: tls)
    shared.metrics.outboxMessages = outbox.count
    shared.metrics.outboxBytes = outbox.bytes
  }

  deinit {
    close(wakeDescriptor)
    close(wakeWriter)
    messageSink.finish()
    stateSink.finish()
  }

  func withShared<R>(_ body: (inout Shared) throws -> R) rethrows -> R {
    try lock.withLock { try body(&shared) }
  }

  var currentTLS: TLSClientContext { withShared { $0.tls } }
  var state: MQTTConnectionState { withShared { $0.state } }

  func metricsSnapshot() -> MQTTMetrics {
    var m = withShared { $0.metrics }
    m.outboxMessages = outbox.count
    m.outboxBytes = outbox.bytes
    m.certificateExpiresIn = .seconds(currentTLS.certificateChain.first.map { $0.notAfter.timeIntervalSinceNow } ?? 0)
    return m
  }

  func wake() {
    var one: UInt8 = 1
    _ = write(wakeWriter, &one, 1)
  }

  func drainWake() {
    var buffer = [UInt8](repeating: 0, count: 256)
    while read(wakeDescriptor, &buffer, buffer.count) > 0 {}
  }

  // MARK: - Calls from the application's threads

  func start() {
    let begin = withShared { s -> Bool in
      guard !s.started && !s.stopping else { return false }
      s.started = true
      return true
    }
    guard begin else { return }
    Threads.detach(name: "edgekey-mqtt") { [self] in
      self.run()
      self.finished.signal()
    }
  }

  func connect(timeout: Duration) async throws {
    let id = UUID()
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
      // The waiter is in place before the network thread starts: a first attempt that fails at
      // once (a refusal on an idle core) must reach it, not leave it waiting for the next
      // attempt minutes later (the untrusted-CA flake's second half).
      let now: Result<Void, any Error>? = withShared { s in
        if case .connected = s.state { return .success(()) }
        if s.stopping { return .failure(MQTTError(kind: .stopped, reason: "the client was stopped")) }
        if case .waiting = s.state, let failure = s.lastFailure { return .failure(failure) }
        s.connectWaiters[id] = c
        return nil
      }
      if let now {
        c.resume(with: now)
        return
      }
      start()
      DispatchQueue.global().asyncAfter(deadline: .now() + timeout.seconds) { [weak self] in
        guard let self else { return }
        let waiter = self.withShared { $0.connectWaiters.removeValue(forKey: id) }
        let endpoints = self.configuration.endpoints.map(\.description).joined(separator: ", ")
        waiter?.resume(
          throwing: MQTTError(kind: .timedOut, reason: "not connected to \(endpoints) after \(timeout.secondsText)"))
      }
    }
  }

  static func checkTopic(_ topic: String) throws(MQTTError) { try MQTTTopic.checkName(topic) }

  func sendAtMostOnce(_ message: MQTTMessage) throws(MQTTError) {
    try Engine.checkTopic(message.topic)
    let accepted = withShared { s -> Bool in
      guard case .connected = s.state else { return false }
      s.atMostOnce.append(message)
      s.metrics.messagesQueued += 1
      return true
    }
    guard accepted else {
      throw MQTTError(kind: .notConnected, reason: "not connected: a QoS 0 message is not stored, so it was refused")
    }
    wake()
  }

  private func stored(_ messages: [MQTTMessage], expiry: Duration?) throws(MQTTError) -> [OutboxMessage] {
    let now = Date()
    return try messages.map { (m: MQTTMessage) throws(MQTTError) -> OutboxMessage in
      guard m.qos != .atMostOnce else {
        throw MQTTError(kind: .invalidArgument, reason: "QoS 0 messages are not stored; use publish")
      }
      try Engine.checkTopic(m.topic)
      return OutboxMessage(
        id: 0, topic: m.topic, payload: m.payload, qos: m.qos, retain: m.retain, created: now,
        expires: expiry.map { now.addingTimeInterval($0.seconds) })
    }
  }

  func enqueue(_ messages: [MQTTMessage], expiry: Duration?) throws(MQTTError) -> [Int64] {
    try accept(try stored(messages, expiry: expiry), waiter: nil)
  }

  /// The async `enqueue`: returns once the messages are stored. A commit that waits for the
  /// disk (`.powerSafe`) runs on EdgeKey's own thread, shared with the appends that arrive
  /// meanwhile, and the caller's task is suspended, not blocked; one that does not runs at once.
  func enqueueAsync(_ messages: [MQTTMessage], expiry: Duration?) async throws(MQTTError) -> [Int64] {
    let records = try stored(messages, expiry: expiry)
    guard outbox.commitsWaitForTheDisk else { return try accept(records, waiter: nil) }
    let result = await withCheckedContinuation { (c: CheckedContinuation<Result<[Int64], MQTTError>, Never>) in
      outbox.append(records, whileLocked: registered(waiter: nil)) { [self] result in
        c.resume(returning: result.map { accepted($0, count: records.count) }.mapError { refused($0, records.count) })
      }
    }
    return try result.get()
  }

  func publishAndWait(_ message: MQTTMessage, expiry: Duration?) async throws {
    let records = try stored([message], expiry: expiry)
    let waitsForTheDisk = outbox.commitsWaitForTheDisk
    // Resumed at the broker's acknowledgement (registered as the message is stored), or with
    // the error that kept it from being stored.
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
      guard waitsForTheDisk else {
        do {
          _ = try accept(records, waiter: c)
        } catch {
          c.resume(throwing: error)
        }
        return
      }
      outbox.append(records, whileLocked: registered(waiter: c)) { [self] result in
        switch result {
        case .success(let r): _ = accepted(r, count: records.count)
        case .failure(let error): c.resume(throwing: refused(error, records.count))
        }
      }
    }
  }

  /// Stores messages in the outbox; registers `waiter` for the first before the network
  /// thread can see it.
  private func accept(_ records: [OutboxMessage], waiter: CheckedContinuation<Void, any Error>?) throws(MQTTError)
    -> [Int64]
  {
    do throws(MQTTError) {
      return accepted(try outbox.append(records, whileLocked: registered(waiter: waiter)), count: records.count)
    } catch {
      throw refused(error, records.count)
    }
  }

  /// What runs as messages are stored, before the network thread can see them.
  private func registered(waiter: CheckedContinuation<Void, any Error>?) -> ([OutboxMessage]) -> Void {
    { stored in
      self.withShared { s in
        if let waiter, let first = stored.first { s.publishWaiters[first.id] = waiter }
        s.outboxChanged = true
        s.metrics.messagesQueued += stored.count
      }
    }
  }

  /// After a successful append: the dropped messages' waiters fail, the network thread wakes.
  private func accepted(_ result: (stored: [OutboxMessage], dropped: [Int64]), count: Int) -> [Int64] {
    if !result.dropped.isEmpty { dropped(result.dropped, reason: "full") }
    wake()
    return result.stored.map(\.id)
  }

  private func refused(_ error: MQTTError, _ count: Int) -> MQTTError {
    if error.kind == .outboxFull { withShared { $0.metrics.messagesRefused += count } }
    return error
  }

  /// Fails the waiters of messages that left the outbox unsent.
  func dropped(_ ids: [Int64], reason: String) {
    let waiters = withShared { s -> [CheckedContinuation<Void, any Error>] in
      s.metrics.messagesDropped[reason, default: 0] += ids.count
      return ids.compactMap { s.publishWaiters.removeValue(forKey: $0) }
    }
    let text =
      reason == "full"
      ? "dropped to make room in the full outbox (dropOldest)" : "dropped unsent: \(reason)"
    for w in waiters { w.resume(throwing: MQTTError(kind: .dropped, reason: "the message was \(text)")) }
  }

  func subscribe(_ filter: String, qos: MQTTQoS) async throws -> MQTTQoS {
    try MQTTTopic.checkFilter(filter)
    start()
    let granted = try await withCheckedThrowingContinuation { (c: CheckedContinuation<MQTTQoS, any Error>) in
      let stopped = withShared { s -> Bool in
        if s.stopping { return true }
        s.subscriptions.removeAll { $0.filter == filter }
        s.subscriptions.append((filter, qos))
        s.pendingUnsubscribes.removeAll { $0 == filter }
        if !s.pendingSubscribes.contains(filter) { s.pendingSubscribes.append(filter) }
        s.subscribeWaiters[filter, default: []].append(c)
        return false
      }
      if stopped { c.resume(throwing: MQTTError(kind: .stopped, reason: "the client was stopped")) }
      wake()
    }
    return granted
  }

  func unsubscribe(_ filter: String) {
    withShared { s in
      s.subscriptions.removeAll { $0.filter == filter }
      s.pendingSubscribes.removeAll { $0 == filter }
      s.pendingUnsubscribes.append(filter)
    }
    wake()
  }

  func replaceCredentials(_ tls: TLSClientContext, reconnect: Bool) {
    withShared { s in
      s.tls = tls
      s.swapRequested = reconnect
      s.metrics.credentialSwaps += 1
    }
    wake()
  }

  func stop() {
    let (wasStarted, alreadyStopping) = withShared { s -> (Bool, Bool) in
      defer { s.stopping = true }
      return (s.started, s.stopping)
    }
    wake()
    if wasStarted && !alreadyStopping {
      finished.wait()
      finished.signal()  // for another stop() that waits too
    }
    if !wasStarted { finish() }
  }

  // MARK: - The network thread

  func setState(_ new: MQTTConnectionState) {
    withShared { s in
      s.state = new
      if case .connected = new { s.metrics.connected = true } else { s.metrics.connected = false }
    }
    stateSink.yield(new)
  }

  /// The version to speak to `endpoint`: the pinned one, or for `.automatic` MQTT 5 until the
  /// endpoint showed it speaks only 3.1.1.
  private func version(for endpoint: MQTTEndpoint, fallbacks: Set<String>) -> MQTTProtocolVersion {
    switch configuration.protocolVersion {
    case .automatic: return fallbacks.contains(endpoint.description) ? .v311 : .v5
    case let pinned: return pinned
    }
  }

  private func run() {
    var failures = 0
    var endpointIndex = 0
    // Endpoints that showed they do not speak MQTT 5 (automatic version only), for this
    // client's lifetime.
    var fallbacks = Set<String>()
    // Endpoints being tried in 3.1.1 after an MQTT 5 CONNECT went unanswered: kept if 3.1.1
    // connects, forgotten if it fails too (then it was not the version).
    var tentative = Set<String>()
    // Endpoints whose next connection is the first in 3.1.1 (counted when it connects).
    var firstFallback = Set<String>()
    // TLS 1.3 connections in a row that ended right after our certificate with no alert: a
    // reset or a refusal whose alert was lost. Transient, until it keeps happening.
    var closedAfterCertificate = 0
    while true {
      let (tls, stopping) = withShared { s -> (TLSClientContext, Bool) in
        s.swapRequested = false
        return (s.tls, s.stopping)
      }
      if stopping { break }
      let endpoint = configuration.endpoints[endpointIndex % configuration.endpoints.count]
      setState(.connecting(endpoint))
      withShared { $0.metrics.connectAttempts += 1 }
      let speaking = version(for: endpoint, fallbacks: fallbacks)
      var outcome: ConnectionOutcome
      do {
        let connection = try Connection(
          engine: self, tls: tls, endpoint: endpoint, version: speaking,
          countsFallback: firstFallback.remove(endpoint.description) != nil)
        outcome = connection.run()
      } catch {
        outcome = .failed(error, refused: false, reason: "client")
      }
      let key = endpoint.description
      if configuration.protocolVersion == .automatic, speaking == .v5, case .failed(let error, _, let reason) = outcome
      {
        if (error as? MQTTError)?.kind == .protocolVersionUnsupported {
          // Not a failure of ours or of the network: speak 3.1.1 to this endpoint, now.
          fallbacks.insert(key)
          firstFallback.insert(key)
          logger.warning("\(error); speaking MQTT 3.1.1 to \(endpoint) from now on")
          continue
        }
        if reason == "timeout-after-tls" {
          fallbacks.insert(key)
          firstFallback.insert(key)
          tentative.insert(key)
          logger.warning("\(error); trying MQTT 3.1.1")
          continue
        }
      }
      if tentative.contains(key) {
        tentative.remove(key)
        // 3.1.1 fared no better: the version was not the problem.
        if case .failed = outcome { fallbacks.remove(key) }
      }
      if case .failed(let error, _, let reason) = outcome, (error as? TLSError)?.code == .closedAfterOurCertificate {
        closedAfterCertificate += 1
        // Three in a row is no longer a coincidence: wait as after a refusal.
        if closedAfterCertificate >= 3 { outcome = .failed(error, refused: true, reason: reason) }
      } else if case .failed = outcome {
        closedAfterCertificate = 0
      }
      var delay = Duration.zero
      var why = ""
      switch outcome {
      case .stopped:
        break
      case .swapped:
        failures = 0
        closedAfterCertificate = 0
        continue
      case .failed(let error, let refused, let reason):
        failures += 1
        endpointIndex += 1
        why = "\(error)"
        withShared { s in
          s.lastFailureRecord = MQTTFailure(
            time: Date(), layer: (error as? TLSError)?.layer.rawValue ?? "mqtt", description: why)
          s.metrics.connectFailures[reason, default: 0] += 1
          if let t = error as? TLSError { s.metrics.handshakeFailures[t.codeName, default: 0] += 1 }
        }
        failConnectWaiters(error)
        delay = configuration.reconnect.delay(
          failures: failures, refused: refused, random: Double.random(in: 0..<1))
      case .lost(let reason, let upFor):
        closedAfterCertificate = 0
        if upFor >= configuration.reconnect.stableAfter { failures = 0 }
        failures += 1
        why = reason
        withShared { s in
          s.metrics.disconnections += 1
          s.lastFailureRecord = MQTTFailure(time: Date(), layer: "network", description: reason)
        }
        delay = configuration.reconnect.delay(failures: failures, refused: false, random: Double.random(in: 0..<1))
      }
      if case .stopped = outcome { break }
      setState(.waiting(retryIn: delay, reason: why))
      logger.info("next attempt in \(Text.fixed(delay.seconds, 1)) s after: \(why)")
      waitInterruptibly(delay)
    }
    finish()
  }

  /// Sleeps `delay`, or until stopped or given new credentials.
  private func waitInterruptibly(_ delay: Duration) {
    // Monotonic: a clock stepped by NTP neither stretches nor skips the back-off.
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: delay)
    while true {
      let (stopping, swapped) = withShared { ($0.stopping, $0.swapRequested) }
      let left = (deadline - clock.now).seconds
      if stopping || swapped || left <= 0 { return }
      var fd = pollfd(fd: wakeDescriptor, events: Int16(POLLIN), revents: 0)
      _ = poll(&fd, 1, Int32(min(left, 3600) * 1000) + 1)
      drainWake()
    }
  }

  private func failConnectWaiters(_ error: any Error) {
    let waiters = withShared { s -> [CheckedContinuation<Void, any Error>] in
      s.lastFailure = error
      defer { s.connectWaiters.removeAll() }
      return Array(s.connectWaiters.values)
    }
    for w in waiters { w.resume(throwing: error) }
  }

  /// Ends every wait once the network thread has stopped.
  private func finish() {
    setState(.stopped)
    let stopped = MQTTError(kind: .stopped, reason: "the client was stopped")
    let (connects, publishes, subscribes) = withShared { s in
      defer {
        s.connectWaiters.removeAll()
        s.publishWaiters.removeAll()
        s.subscribeWaiters.removeAll()
      }
      return (Array(s.connectWaiters.values), Array(s.publishWaiters.values), s.subscribeWaiters.values.flatMap { $0 })
    }
    for w in connects { w.resume(throwing: stopped) }
    for w in publishes { w.resume(throwing: stopped) }
    for w in subscribes { w.resume(throwing: stopped) }
  }

  // Called by `Connection` on the network thread.

  func connected(
    _ endpoint: MQTTEndpoint, afterFallback: Bool, version: MQTTProtocolVersion, resumed: Bool, connack: MQTTConnack
  ) {
    let waiters = withShared { s -> [CheckedContinuation<Void, any Error>] in
      s.versionInUse = version
      s.connack = connack
      s.metrics.connections += 1
      if resumed { s.metrics.resumedConnections += 1 }
      s.lastFailure = nil
      if afterFallback { s.metrics.protocolFallbacks += 1 }
      // Everything we want is subscribed again on a new connection.
      s.pendingSubscribes = s.subscriptions.map(\.filter)
      s.outboxChanged = true
      defer { s.connectWaiters.removeAll() }
      return Array(s.connectWaiters.values)
    }
    setState(.connected(endpoint))
    for w in waiters { w.resume() }
  }

  func acknowledged(_ ids: [Int64], rejected: [(Int64, Int32)]) {
    do {
      try outbox.remove(ids + rejected.map(\.0))
    } catch {
      logger.error("\(error)")
    }
    let (ok, bad) = withShared {
      s -> ([CheckedContinuation<Void, any Error>], [(CheckedContinuation<Void, any Error>, Int32)]) in
      s.metrics.messagesAcknowledged += ids.count
      if !rejected.isEmpty { s.metrics.messagesDropped["rejected", default: 0] += rejected.count }
      let ok = ids.compactMap { s.publishWaiters.removeValue(forKey: $0) }
      let bad = rejected.compactMap { r in s.publishWaiters.removeValue(forKey: r.0).map { ($0, r.1) } }
      return (ok, bad)
    }
    for w in ok { w.resume() }
    for (w, code) in bad {
      let text = String(cString: mosquitto_reason_string(code))
      w.resume(throwing: MQTTError(kind: .rejected(code), reason: "the broker refused the message: \(text) (\(code))"))
    }
  }

  func subscribed(_ filter: String, granted: Int32) {
    let waiters = withShared { $0.subscribeWaiters.removeValue(forKey: filter) ?? [] }
    for w in waiters {
      if let qos = MQTTQoS(rawValue: granted) {
        w.resume(returning: qos)
      } else {
        let text = String(cString: mosquitto_reason_string(granted))
        w.resume(
          throwing: MQTTError(
            kind: .rejected(granted), reason: "the broker refused the subscription to \(filter): \(text)"))
      }
    }
  }

  func received(_ message: MQTTMessage) {
    withShared { $0.metrics.messagesReceived += 1 }
    if case .dropped = messageSink.yield(message) {
      let dropped = withShared { s -> Int in
        s.metrics.messagesReceivedDropped += 1
        return s.metrics.messagesReceivedDropped
      }
      // Said once, then every 1000th: a stalled consumer must not flood the log too.
      if dropped == 1 || dropped % 1000 == 0 {
        logger.warning(
          "the messages consumer is \(configuration.receiveBuffer) messages behind: the oldest are dropped "
            + "(\(dropped) so far)")
      }
    }
  }

  func countSent(_ n: Int, resent: Int) {
    withShared { s in
      s.metrics.messagesSent += n
      s.metrics.messagesResent += resent
    }
  }
}
