import EdgeKeyCore
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// What a fault did to a QoS 1 stream: accepted by the client, arrived at an independent
/// subscriber, arrived twice, never arrived (must be 0).
struct DeliveryReport: CustomStringConvertible {
  var fault: String
  var accepted = 0
  var delivered = 0
  var duplicated = 0
  var lost = 0
  var connections = 0
  var resumed = 0
  var failures: [String: Int] = [:]
  var handshakeFailures: [String: Int] = [:]
  var dropped: [String: Int] = [:]

  var description: String {
    func list(_ d: [String: Int]) -> String {
      d.isEmpty ? "none" : d.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
    }
    return "fault report: \(fault): sent \(accepted), delivered \(delivered), duplicated \(duplicated), "
      + "lost \(lost); connections \(connections) (\(resumed) resumed); failed attempts: \(list(failures)); "
      + "failed handshakes: \(list(handshakeFailures)); dropped: \(list(dropped))"
  }
}

/// The fault: called with the batch number about to be published (0..<batches).
typealias FaultScript = @Sendable (Int) async throws -> Void

@Suite("Fault injection: the broker paused, the network cut, connections reset, the TPM restarted", .serialized)
struct FaultInjectionTests {
  static let batches = 8
  static let perBatch = 40

  /// Publishes `batches` × `perBatch` QoS 1 messages through `endpoint` (the broker, or a proxy
  /// before it) while `fault` runs, and counts what an independent subscriber on the broker got.
  func stream(
    _ name: String, f: Fixture, broker: MosquittoBroker, endpointPort: UInt16, tls: TLSClientContext? = nil,
    fault: FaultScript
  ) async throws -> DeliveryReport {
    // The subscriber: software key, straight to the broker, a session that survives its own
    // reconnects (keepalive long enough not to notice a paused broker).
    var sinkConfiguration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    sinkConfiguration.cleanSession = false
    sinkConfiguration.protocolVersion = .v311
    sinkConfiguration.reconnect = quickReconnect
    let sink = try MQTTClient(sinkConfiguration, tls: try f.softwareParty("sink-\(name)"))
    try await sink.connect()
    try await sink.subscribe("devices/+/telemetry", qos: .atLeastOnce)

    // The device: TPM key, durable outbox, a short keepalive so that a silent network is noticed.
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: endpointPort)
    configuration.reconnect = quickReconnect
    configuration.keepAlive = .seconds(5)  // libmosquitto's minimum
    configuration.connectTimeout = .seconds(3)
    let publisher = try MQTTClient(
      configuration, tls: try tls ?? f.context(serverName: "127.0.0.1"),
      outbox: try Outbox(path: temporaryPath("outbox.db")),
      logger: ProcessInfo.processInfo.environment["EDGEKEY_TEST_LOG"] == nil
        ? .disabled : Logger(label: name, level: .debug, handler: StandardErrorLogHandler()))
    try await publisher.connect()
    var tooShort = configuration
    tooShort.keepAlive = .seconds(2)
    #expect(throws: MQTTError.self) { try MQTTClient(tooShort, tls: try f.context(serverName: "127.0.0.1")) }
    tooShort.keepAlive = .milliseconds(5500)  // MQTT's keep alive is whole seconds
    #expect(throws: MQTTError.self) { try MQTTClient(tooShort, tls: try f.context(serverName: "127.0.0.1")) }

    var accepted = Set<String>()
    for batch in 0..<Self.batches {
      try await fault(batch)
      for i in 0..<Self.perBatch {
        let text = "\(name) \(batch * Self.perBatch + i)"
        try await publisher.enqueue([
          MQTTMessage(topic: "devices/d/telemetry", payload: Array(text.utf8), qos: .atLeastOnce)
        ])
        accepted.insert(text)
      }
      try await Task.sleep(nanoseconds: 250_000_000)
    }
    try await fault(Self.batches)  // the fault's chance to end (resume, heal, restart)
    var undelivered: (any Error)?
    do { try await publisher.waitUntilDelivered(timeout: .seconds(60)) } catch { undelivered = error }
    let (got, duplicates) = await drain(sink, expecting: accepted, within: undelivered == nil ? 30 : 1)
    let m = publisher.metrics
    await publisher.stop()
    await sink.stop()
    let report = DeliveryReport(
      fault: name, accepted: accepted.count, delivered: got.intersection(accepted).count, duplicated: duplicates,
      lost: accepted.subtracting(got).count, connections: m.connections, resumed: m.resumedConnections,
      failures: m.connectFailures,
      handshakeFailures: m.handshakeFailures, dropped: m.messagesDropped)
    print(report)
    #expect(undelivered == nil, "\(undelivered.map { "\($0)" } ?? "")")
    #expect(report.lost == 0, "\(report)")
    #expect(m.messagesDroppedTotal == 0)
    #expect(publisher.outbox.count == 0)
    return report
  }

  @Test("the broker paused (SIGSTOP) for 13 s, then resumed: keepalive notices, nothing accepted is lost")
  func brokerPaused() async throws {
    // On an executor of its own: this suite runs serialized and sets the length of the whole
    // run, so its continuations must not queue behind synchronous tests (see onOwnThread).
    try await onOwnThread {
      let f = try Fixture(commonName: "device-0300")
      let broker = try f.broker()
      let report = try await stream("broker-paused", f: f, broker: broker, endpointPort: broker.port) { batch in
        if batch == 2 { broker.pause() }
        if batch > 2 && batch < Self.batches { try await Task.sleep(nanoseconds: 2_500_000_000) }
        if batch == Self.batches { broker.resume() }
      }
      #expect(report.connections >= 2, "the silent broker was never noticed: \(report)")
    }
  }

  @Test("the network cut (every byte dropped, both ways) for 12 s, then healed: reconnects, nothing lost")
  func networkPartition() async throws {
    // On an executor of its own: this suite runs serialized and sets the length of the whole
    // run, so its continuations must not queue behind synchronous tests (see onOwnThread).
    try await onOwnThread {
      let f = try Fixture(commonName: "device-0301")
      let broker = try f.broker()
      let proxy = try FaultProxy(to: broker.port)
      defer { proxy.stop() }
      let report = try await stream("network-partition", f: f, broker: broker, endpointPort: proxy.port) { batch in
        if batch == 2 { proxy.partition() }
        if batch > 2 && batch < 6 { try await Task.sleep(nanoseconds: 4_000_000_000) }
        if batch == 6 { proxy.heal() }
      }
      #expect(proxy.droppedBytes > 0)
      #expect(report.connections >= 2)
      #expect(report.failures.values.reduce(0, +) >= 1, "connects during the cut must have failed: \(report)")
    }
  }

  @Test("every connection reset three times mid-stream (a vanishing broker or middlebox): nothing lost")
  func connectionsReset() async throws {
    // On an executor of its own: this suite runs serialized and sets the length of the whole
    // run, so its continuations must not queue behind synchronous tests (see onOwnThread).
    try await onOwnThread {
      let f = try Fixture(commonName: "device-0302")
      let broker = try f.broker()
      let proxy = try FaultProxy(to: broker.port)
      defer { proxy.stop() }
      // Loaded first, so that a handshake is one command.
      _ = try await f.key.sign(digest: [UInt8](repeating: 1, count: 32), hash: .sha256)
      let before = f.tpm.commandCount
      let report = try await stream("connection-reset", f: f, broker: broker, endpointPort: proxy.port) { batch in
        if batch == 1 || batch == 3 || batch == 5 { proxy.resetAll() }
      }
      #expect(report.connections >= 4)
      // The first connection signs; every reconnect after a reset resumes its TLS session.
      #expect(report.resumed == report.connections - 1, "\(report)")
      #expect(f.tpm.commandCount - before == 1, "TPM commands in the whole stream")
    }
  }

  @Test(
    "swtpm stopped, connections reset: handshakes fail at the TPM layer and are retried; swtpm back (reset): the key is reloaded, nothing lost"
  )
  func tpmRestarted() async throws {
    // On an executor of its own: this suite runs serialized and sets the length of the whole
    // run, so its continuations must not queue behind synchronous tests (see onOwnThread).
    try await onOwnThread {
      let f = try Fixture(commonName: "device-0303")
      let broker = try f.broker()
      let proxy = try FaultProxy(to: broker.port)
      defer { proxy.stop() }
      let port = f.swtpm.port
      let tls = try f.context(serverName: "127.0.0.1")
      let report = try await stream("tpm-restart", f: f, broker: broker, endpointPort: proxy.port, tls: tls) { batch in
        if batch == 2 {
          f.swtpm.stop()
          tls.forgetSessions()  // a resumed reconnect would not need the TPM at all
          proxy.resetAll()  // the next connection needs a signature
        }
        if batch > 2 && batch < 5 { try await Task.sleep(nanoseconds: 1_500_000_000) }
        if batch == 5 {
          try f.swtpm.start()  // a power cycle: the SRK and our key are no longer loaded
          #expect(f.swtpm.port == port)
        }
      }
      #expect(report.connections >= 2)
      let tpmFailures = report.handshakeFailures["tpmSigningFailed", default: 0]
      #expect(tpmFailures >= 1, "attempts while the TPM was down must fail at the TPM layer: \(report)")
      // And the key still signs in the TPM that came back.
      await #expect(try f.key.sign(digest: [UInt8](repeating: 7, count: 32), hash: .sha256).bytes.count > 0)
    }
  }

  @Test(
    "swtpm hung (SIGSTOP) while connections reset: each handshake ends in a TPM timeout and is retried; nothing lost")
  func tpmHung() async throws {
    // On an executor of its own: this suite runs serialized and sets the length of the whole
    // run, so its continuations must not queue behind synchronous tests (see onOwnThread).
    try await onOwnThread {
      let f = try Fixture(commonName: "device-0304")
      let broker = try f.broker()
      let proxy = try FaultProxy(to: broker.port)
      defer { proxy.stop() }
      f.key.tpm.commandTimeout = .seconds(1)
      let tls = try f.context(serverName: "127.0.0.1")
      let report = try await stream("tpm-hung", f: f, broker: broker, endpointPort: proxy.port, tls: tls) { batch in
        if batch == 2 {
          f.swtpm.pause()
          tls.forgetSessions()  // a resumed reconnect would not need the TPM at all
          proxy.resetAll()  // the next connection needs a signature from a TPM that answers nothing
        }
        if batch > 2 && batch < 5 { try await Task.sleep(nanoseconds: 1_500_000_000) }
        if batch == 5 { f.swtpm.resume() }
      }
      #expect(report.connections >= 2)
      let tpmFailures = report.handshakeFailures["tpmSigningFailed", default: 0]
      #expect(tpmFailures >= 1, "attempts while the TPM hung must fail at the TPM layer: \(report)")
    }
  }

  @Test("one reset right after our Certificate (TLS 1.3): transient, retried at once, never the refusal schedule")
  func resetAfterOurCertificate() async throws {
    // On an executor of its own: this suite runs serialized and sets the length of the whole
    // run, so its continuations must not queue behind synchronous tests (see onOwnThread).
    try await onOwnThread {
      let f = try Fixture(commonName: "device-0305")
      let broker = try f.broker()
      let proxy = try FaultProxy(to: broker.port)
      defer { proxy.stop() }
      proxy.resetNextConnection(atClientFlight: 2)
      var configuration = MQTTConfiguration(host: "127.0.0.1", port: proxy.port)
      configuration.reconnect = quickReconnect  // a refusal would wait 300 s or more
      let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
      defer { client.stop() }
      client.start()
      var sawWaiting: [Duration] = []
      for await state in client.stateChanges {
        if case .waiting(let retryIn, _) = state {
          sawWaiting.append(retryIn)
          if retryIn >= .seconds(10) { break }  // the refusal schedule: the failure this test is about
        }
        if case .connected = state { break }
      }
      #expect(client.isConnected)
      #expect(sawWaiting.allSatisfy { $0 < .seconds(10) }, "a reset must not start the refusal schedule: \(sawWaiting)")
      let failures = client.metrics.handshakeFailures
      #expect(
        failures["closedAfterOurCertificate", default: 0] + failures["connectionFailed", default: 0] >= 1, "\(failures)"
      )
      #expect(client.metrics.connectAttempts == 2)
    }
  }
}
