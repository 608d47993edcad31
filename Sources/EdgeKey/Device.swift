import Dispatch
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// A device: its TPM, its credential store, the renewal that keeps its certificate valid, and
/// the mutual-TLS MQTT connection that uses it. One type for a daemon:
///
///     let device = try await Device.open(try DeviceConfiguration(contentsOf: "/etc/edgekey.conf"))
///     try await device.start()                 // a valid credential (enrolled if needed), connected
///     let commands = try await device.messages("devices/\(device.name)/commands/#")
///     try await device.publish("devices/\(device.name)/telemetry", json: reading)
///     try await device.run()                   // until SIGTERM/SIGINT or cancellation
///
/// Renewal, reconnection, the switch to each new certificate and the retirement of the old key
/// happen inside. Every call that can wait is `async` and cancellable: TPM work, EST and the
/// outbox's fsync run on EdgeKey's own threads, never on the cooperative pool, and a
/// cancellation reaches an EST transfer or a 202 wait within about a second.
public final class Device: @unchecked Sendable {
  // @unchecked: the mutable state is behind `lock`; the rest is immutable or Sendable.
  /// What the device was opened with.
  public let configuration: DeviceConfiguration
  /// The TPM its keys live in (the process's one context for that TCTI).
  public let tpm: TPM
  /// Its credential store: the state directory.
  public let store: CredentialStore
  private let agent: RenewalAgent
  private let switcher: MQTTCredentialSwitch
  private let stateLock: StateLock
  private let outbox: Outbox
  private let logger: Logger
  private let lock = Lock()
  private var client: MQTTClient?
  private var routes: [Route] = []
  private var dispatcher: Task<Void, Never>?
  private var exporter: Task<Void, Never>?
  private var dropped = 0

  private struct Route {
    var id: Int
    var filter: String
    var sink: AsyncStream<MQTTMessage>.Continuation
  }

  /// Opens the TPM and the credential store (on a thread of EdgeKey's: TPM2_Startup, a flush
  /// of objects left by a dead process). One `Device` per state directory: a second process
  /// gets ``EdgeKeyError/Code/storage``.
  public static func open(_ configuration: DeviceConfiguration) async throws(EdgeKeyError) -> Device {
    try await Offload.run("opening the device") { () throws -> Device in try Device(configuration) }
  }

  private init(_ configuration: DeviceConfiguration) throws {
    self.configuration = configuration
    logger = configuration.logger
    tpm = try TPM.open(tcti: configuration.tcti, logger: logger)
    store = try CredentialStore(directory: configuration.stateDirectory)
    stateLock = try StateLock(store)
    outbox =
      configuration.durableOutbox ? try Outbox(path: configuration.stateDirectory + "/outbox.db") : Outbox.memory()
    let brokerAnchors = configuration.brokerTrustAnchors ?? configuration.trustAnchors
    switcher = MQTTCredentialSwitch(
      policy: TLSPolicy(
        trustAnchorsPEM: brokerAnchors.map(\.pem).joined(),
        serverName: configuration.brokerServerName ?? configuration.mqtt.host), logger: logger)
    var options = ESTOptions()
    options.logger = logger.labeled("edgekey.est")
    let settings = EnrollmentSettings(
      server: try ESTServer(url: configuration.enrollmentServer, label: configuration.enrollmentLabel),
      trustAnchors: configuration.trustAnchors, options: options, password: configuration.enrollmentPassword)
    let logger = logger
    agent = RenewalAgent(
      store: store, tpm: tpm, settings: settings, policy: configuration.renewal,
      identity: configuration.subject.map { (subject: $0, names: []) },
      onEvent: { logger.info("renewal: \($0)") }, install: switcher.install)
  }

  deinit {
    dispatcher?.cancel()
    exporter?.cancel()
  }

  /// The device's name: its certificate's common name (empty before the first enrollment).
  public var name: String { (try? store.read(.current))?.certificate?.commonName ?? "" }

  /// The renewal's counters (attempts, renewals, keys created and retired, attested requests).
  public var renewalCounters: RenewalCounters { agent.counters }

  /// The MQTT client, once ``start()`` has made it.
  public var mqttClient: MQTTClient? { lock.withLock { client } }

  /// A valid credential: the stored one, or a new one enrolled (with the bootstrap credential or
  /// the enrollment password when the stored certificate expired while the device was off, or
  /// its key was lost), retried with the renewal's back-off until it works or the task is
  /// cancelled. Throws ``EdgeKeyError/Code/credentialLost`` when there is nothing to enrol with.
  @discardableResult
  public func credential() async throws(EdgeKeyError) -> Credential {
    let agent = self.agent
    let working = try await Offload.run("checking the stored credential") { try agent.hasWorkingCredential() }
    if working {
      do { if let credential = try store.read(.current) { return credential } } catch { throw EdgeKeyError(error) }
    }
    let before = agent.counters.renewals
    agent.start()
    let clock = ContinuousClock()
    while agent.counters.renewals == before {
      if let error = agent.lastError, error.kind == .credentialLost {
        await Offload.quietly { agent.stop() }
        throw EdgeKeyError(error)
      }
      if Task.isCancelled {
        // Cuts an EST transfer or a Retry-After wait short within about a second.
        await Offload.quietly { agent.stop() }
        throw EdgeKeyError(.cancelled, layer: .caller, reason: "cancelled while enrolling")
      }
      try? await clock.sleep(for: .milliseconds(50))
    }
    do {
      guard let credential = try store.read(.current) else {
        throw EdgeKeyError(.storage, layer: .storage, reason: "the enrolled credential is not in the store")
      }
      return credential
    } catch {
      throw EdgeKeyError(error)
    }
  }

  /// A valid credential (``credential()``), then the MQTT connection in the background (it
  /// reconnects by itself) and the renewal. Returns once started; ``connected(timeout:)`` waits
  /// for the broker.
  public func start() async throws(EdgeKeyError) {
    if lock.withLock({ client != nil }) { return }
    let credential = try await credential()
    let tpm = self.tpm
    let key = try await Offload.run("loading the device key") { () throws -> TPMKey in
      let key = try tpm.loadKey(credential.key)
      try key.load()
      return key
    }
    var mqtt = configuration.mqtt
    if mqtt.clientID == nil { mqtt.clientID = credential.certificate?.commonName }
    let context: TLSClientContext
    do {
      context = try TLSClientContext(certificateChain: credential.chain, key: key, policy: switcher.policy)
    } catch {
      throw EdgeKeyError(error, context: "the TLS identity")
    }
    let made: MQTTClient
    do { made = try MQTTClient(mqtt, tls: context, outbox: outbox, logger: logger) } catch {
      throw EdgeKeyError(error, context: "the MQTT client")
    }
    let started = lock.withLock { () -> Bool in
      guard client == nil else { return false }
      client = made
      return true
    }
    guard started else { return }
    switcher.attach(made, agent: agent)
    made.start()
    agent.start()
    dispatcher = Task.detached { [weak self] in
      for await message in made.messages {
        guard let self else { return }
        self.route(message)
      }
    }
    if let file = configuration.metricsFile { startExporter(file) }
  }

  /// Waits until ``start()`` (called by another task, or by ``run()``) has made the client.
  func started() async throws(EdgeKeyError) {
    while mqttClient == nil {
      if Task.isCancelled { throw EdgeKeyError(.cancelled, layer: .caller, reason: "cancelled") }
      try? await ContinuousClock().sleep(for: .milliseconds(20))
    }
  }

  /// Waits until the broker has accepted us (after ``start()``).
  public func connected(timeout: Duration = .seconds(30)) async throws(EdgeKeyError) {
    guard let client = mqttClient else {
      throw EdgeKeyError(.configuration, layer: .caller, reason: "start() the device first")
    }
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: timeout)
    while !client.isConnected {
      if Task.isCancelled { throw EdgeKeyError(.cancelled, layer: .caller, reason: "cancelled") }
      if clock.now >= deadline {
        let why = client.lastFailure.map { ": \($0.description)" } ?? ""
        throw EdgeKeyError(.brokerUnreachable, layer: .mqtt, reason: "not connected after \(timeout)\(why)")
      }
      try? await clock.sleep(for: .milliseconds(20))
    }
  }

  /// Accepts a message: QoS 1 and 2 are stored in the outbox (durably, on EdgeKey's thread)
  /// and sent as soon as the broker is reachable; returns once stored. QoS 0 is sent now, or
  /// refused while offline.
  public func publish(_ topic: String, _ payload: [UInt8], qos: MQTTQoS = .atLeastOnce, retain: Bool = false)
    async throws(EdgeKeyError)
  {
    guard let client = mqttClient else {
      throw EdgeKeyError(.configuration, layer: .caller, reason: "start() the device before publishing")
    }
    do { try MQTTTopic.checkName(topic) } catch { throw EdgeKeyError(error) }
    let message = MQTTMessage(topic: topic, payload: payload, qos: qos, retain: retain)
    if qos == .atMostOnce {
      do { try await client.publish(topic: topic, payload: payload, qos: .atMostOnce, retain: retain) } catch {
        throw EdgeKeyError(error)
      }
      return
    }
    _ = try await Offload.run("storing the message") { try client.enqueue([message]) }
  }

  /// ``publish(_:_:qos:retain:)`` with UTF-8 text.
  public func publish(_ topic: String, text: String, qos: MQTTQoS = .atLeastOnce, retain: Bool = false)
    async throws(EdgeKeyError)
  {
    try await publish(topic, Array(text.utf8), qos: qos, retain: retain)
  }

  /// ``publish(_:_:qos:retain:)`` with `value` as JSON.
  public func publish(
    _ topic: String, json value: some Encodable & Sendable, qos: MQTTQoS = .atLeastOnce, retain: Bool = false
  ) async throws(EdgeKeyError) {
    let bytes: [UInt8]
    do { bytes = Array(try JSONEncoder().encode(value)) } catch {
      throw EdgeKeyError(.configuration, layer: .caller, reason: "the value is not JSON-encodable: \(error)")
    }
    try await publish(topic, bytes, qos: qos, retain: retain)
  }

  /// Waits until every accepted message is acknowledged by the broker.
  public func delivered(timeout: Duration = .seconds(30)) async throws(EdgeKeyError) {
    guard let client = mqttClient else { return }
    do { try await client.waitUntilDelivered(timeout: timeout) } catch { throw EdgeKeyError(error) }
  }

  /// The messages on `filter` (`+` and `#` allowed), its own stream: subscribed now, and again
  /// after every reconnection. Ends when the device stops, or when the consumer lets go (then
  /// unsubscribed, unless another stream has the same filter). A consumer that falls behind by
  /// ``DeviceConfiguration/subscriptionBuffer`` messages loses the oldest (counted in
  /// ``openMetrics()``).
  public func messages(_ filter: String, qos: MQTTQoS = .atLeastOnce) async throws(EdgeKeyError)
    -> AsyncStream<MQTTMessage>
  {
    guard let client = mqttClient else {
      throw EdgeKeyError(.configuration, layer: .caller, reason: "start() the device before subscribing")
    }
    do { try MQTTTopic.checkFilter(filter) } catch { throw EdgeKeyError(error) }
    let (stream, sink) = AsyncStream.makeStream(
      of: MQTTMessage.self, bufferingPolicy: .bufferingNewest(max(1, configuration.subscriptionBuffer)))
    let id = lock.withLock { () -> Int in
      let id = (routes.map(\.id).max() ?? 0) + 1
      routes.append(Route(id: id, filter: filter, sink: sink))
      return id
    }
    sink.onTermination = { [weak self] _ in
      guard let self else { return }
      let others = self.lock.withLock { () -> Bool in
        self.routes.removeAll { $0.id == id }
        return self.routes.contains { $0.filter == filter }
      }
      if !others { client.unsubscribe(filter) }
    }
    // Subscribed now if connected, else on connecting; the broker's answer is not waited for
    // (a broker that is down must not hold up a daemon's start).
    let logger = self.logger
    Task.detached {
      do { _ = try await client.subscribe(filter, qos: qos) } catch {
        // The client subscribes again at its next connection; the failure is said, not dropped.
        logger.warning("subscribing to \(filter): \(error)")
      }
    }
    return stream
  }

  private func route(_ message: MQTTMessage) {
    let sinks = lock.withLock {
      routes.filter { MQTTTopic.matches(filter: $0.filter, topic: message.topic) }.map(\.sink)
    }
    for sink in sinks {
      if case .dropped = sink.yield(message) { lock.withLock { dropped += 1 } }
    }
  }

  /// Runs until SIGTERM or SIGINT (or the task is cancelled), then stops cleanly: starts the
  /// device if needed, tells systemd READY=1 once connected and STOPPING=1 at the end, and
  /// pings its watchdog (`WatchdogSec=`) meanwhile; SIGHUP asks for a renewal now. Returns
  /// normally on a signal or cancellation.
  public func run() async throws(EdgeKeyError) {
    let signals = SignalStream([SIGTERM, SIGINT, SIGHUP])
    defer { signals.cancel() }
    try await run(signals: signals)
  }

  func run(signals: SignalStream) async throws(EdgeKeyError) {
    let outcome: Result<Void, EdgeKeyError> = await withTaskGroup(of: Result<Void, EdgeKeyError>?.self) { group in
      group.addTask { () async -> Result<Void, EdgeKeyError>? in
        do throws(EdgeKeyError) {
          try await self.start()
          try await self.connected(timeout: .seconds(365 * 86400))
          Systemd.notify("READY=1\nSTATUS=connected")
          while !Task.isCancelled { try? await ContinuousClock().sleep(for: .seconds(3600)) }
          return nil
        } catch {
          return error.code == .cancelled ? nil : .failure(error)
        }
      }
      if let interval = Systemd.watchdogInterval {
        // systemd's watchdog (WatchdogSec=): pinged at half its interval while we run.
        group.addTask {
          while !Task.isCancelled {
            Systemd.notify("WATCHDOG=1")
            try? await ContinuousClock().sleep(for: interval / 2)
          }
          return nil
        }
      }
      group.addTask {
        for await signal in signals.stream {
          if signal == SIGHUP {
            self.agent.renewSoon()
            continue
          }
          return .success(())
        }
        return nil
      }
      let first = await group.next() ?? nil
      group.cancelAll()
      return first ?? .success(())
    }
    Systemd.notify("STOPPING=1")
    await stop()
    try outcome.get()
  }

  /// Stops renewal (an attempt under way ends within about a second) and the MQTT connection;
  /// messages not yet acknowledged stay in the outbox for the next start. Subscription streams
  /// end.
  public func stop() async {
    let agent = self.agent
    await Offload.quietly { agent.stop() }
    // The last figures, with the connection's, before the client goes.
    if let file = configuration.metricsFile { writeMetrics(to: file) }
    let (client, routes) = lock.withLock { () -> (MQTTClient?, [Route]) in
      defer {
        self.client = nil
        self.routes = []
      }
      return (self.client, self.routes)
    }
    if let client { await Offload.quietly { client.stop() } }
    routes.forEach { $0.sink.finish() }
    dispatcher?.cancel()
    exporter?.cancel()
  }

  // MARK: - Metrics

  /// Every counter as OpenMetrics text: MQTT (messages, connections, outbox), renewal
  /// (attempts, renewals, failures, keys, attested requests), the TPM (commands sent) and
  /// subscription messages dropped.
  public func openMetrics() -> String {
    let counters = agent.counters
    let client = mqttClient
    var text = client?.metrics.openMetrics(labels: [:]).replacing("# EOF\n", with: "") ?? ""
    let renewal: [(String, String, Int)] = [
      ("attempts", "renewal or enrollment attempts", counters.attempts),
      ("renewals", "certificates installed", counters.renewals),
      ("failures", "failed attempts", counters.failures),
      (
        "bootstrap_fallbacks", "enrollments with the bootstrap credential after the current one expired",
        counters.bootstrapFallbacks
      ),
      ("keys_created", "TPM keys created", counters.keysCreated),
      ("keys_retired", "TPM keys retired after their successor worked", counters.keysRetired),
      ("clock_refusals", "attempts refused for an implausible clock", counters.clockRefusals),
      ("credentials_lost", "stored keys the TPM could no longer load", counters.credentialsLost),
      ("attested", "requests sent with TPM2_Certify evidence", counters.attested),
    ]
    for (name, help, value) in renewal {
      text += "# HELP edgekey_renewal_\(name) \(help).\n# TYPE edgekey_renewal_\(name) counter\n"
      text += "edgekey_renewal_\(name)_total \(value)\n"
    }
    text += "# HELP edgekey_tpm_commands TPM commands this process sent.\n# TYPE edgekey_tpm_commands counter\n"
    text += "edgekey_tpm_commands_total \(tpm.commandCount)\n"
    let lost = lock.withLock { dropped }
    text += "# HELP edgekey_subscription_dropped Messages a slow subscription consumer lost.\n"
    text += "# TYPE edgekey_subscription_dropped counter\nedgekey_subscription_dropped_total \(lost)\n"
    if let notAfter = (try? store.read(.current))?.certificate?.notAfter {
      text += "# HELP edgekey_certificate_expiry_seconds When the current certificate expires (Unix time).\n"
      text += "# TYPE edgekey_certificate_expiry_seconds gauge\n"
      text += "edgekey_certificate_expiry_seconds \(Int(notAfter.timeIntervalSince1970))\n"
    }
    return text + "# EOF\n"
  }

  private func startExporter(_ file: String) {
    let interval = configuration.metricsInterval
    exporter = Task.detached { [weak self] in
      while !Task.isCancelled {
        guard let self else { return }
        self.writeMetrics(to: file)
        try? await ContinuousClock().sleep(for: interval)
      }
    }
  }

  /// Written atomically (0644): node_exporter never reads half a file.
  private func writeMetrics(to file: String) {
    do { try AtomicFile.write(Array(openMetrics().utf8), to: file, mode: 0o644) } catch {
      logger.warning("metrics file \(file): \(error)")
    }
  }
}

extension Device {
  /// A daemon's whole life: opens the device from `configurationFile`, starts it (a valid
  /// credential, the connection, renewal), runs `body` (publish, subscribe) beside it, and on
  /// SIGTERM or SIGINT stops cleanly and exits 0. A failure (the configuration, a credential
  /// that cannot be had, `body` throwing) is printed on stderr with its layer, and exits 1.
  public static func main(
    configurationFile: String, _ body: @escaping @Sendable (Device) async throws -> Void
  ) async -> Never {
    let program = CommandLine.arguments.first?.split(separator: "/").last.map(String.init) ?? "edgekey"
    // Watched from the first moment: a SIGTERM while the device enrolls (an EST server's 202
    // wait) stops it cleanly too.
    let signals = SignalStream([SIGTERM, SIGINT, SIGHUP])
    do {
      let device = try await Device.open(try DeviceConfiguration(contentsOf: configurationFile))
      let failure: (any Error)? = await withTaskGroup(of: (isRun: Bool, error: (any Error)?).self) { group in
        group.addTask {
          do { try await device.run(signals: signals) } catch { return (true, error) }
          return (true, nil)
        }
        group.addTask {
          do {
            // After the start run() makes (a credential, the client), or its failure.
            try await device.started()
            try await body(device)
          } catch is CancellationError {} catch let error as EdgeKeyError where error.code == .cancelled {} catch {
            return (false, error)
          }
          return (false, nil)
        }
        while let (isRun, error) = await group.next() {
          // The device stopped (a signal): whatever `body` does next is moot. `body` failed:
          // the device is stopped (run() ends on cancellation) and the failure reported.
          if isRun || error != nil {
            group.cancelAll()
            return error
          }
        }
        return nil
      }
      signals.cancel()
      if let failure { throw failure }
      exit(0)
    } catch {
      let line = Array("\(program): \(EdgeKeyError(error))\n".utf8)
      _ = line.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count) }
      exit(1)
    }
  }
}
