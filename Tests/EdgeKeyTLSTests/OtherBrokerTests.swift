import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

extension Fixture {
  /// amqtt (an MQTT 3.1.1-only broker from PyPI) requiring a client certificate from `clientCA`
  /// (the fixture's CA by default), with a server certificate from the fixture's CA.
  func amqtt(clientCA: String? = nil) throws -> AMQTTBroker {
    let serverCert = try ca.issueServer()
    return try AMQTTBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: clientCA ?? ca.certificatePEM)
  }
}

/// A broker nobody here wrote, that speaks only MQTT 3.1.1: what it does with an MQTT 5 CONNECT
/// must never read as "our certificate refused".
@Suite("A second broker: amqtt, MQTT 3.1.1 only, over mutual TLS")
struct OtherBrokerTests {
  @Test("automatic version: MQTT 5 unanswered, falls back to 3.1.1, QoS 1 messages arrive")
  func automaticFallsBack() async throws {
    let f = try Fixture(commonName: "device-0400")
    let broker = try f.amqtt()
    var sinkConfiguration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    sinkConfiguration.protocolVersion = .v311
    sinkConfiguration.reconnect = quickReconnect
    let sink = try MQTTClient(sinkConfiguration, tls: try f.softwareParty("sink-0400"))
    try await sink.connect()
    try await sink.subscribe("devices/device-0400/#", qos: .atLeastOnce)

    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    configuration.connectTimeout = .seconds(5)  // how long an unanswered MQTT 5 CONNECT is waited for
    #expect(configuration.protocolVersion == .automatic)
    let publisher = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    try await publisher.connect(timeout: .seconds(30))
    var accepted = Set<String>()
    for i in 0..<20 {
      let text = "reading \(i)"
      try await publisher.publish(topic: "devices/device-0400/telemetry", payload: Array(text.utf8))
      accepted.insert(text)
    }
    let (got, _) = await drain(sink, expecting: accepted, within: 30)
    #expect(got == accepted)
    let m = publisher.metrics
    #expect(m.protocolFallbacks == 1)
    #expect(m.handshakeFailures.isEmpty, "the certificate was never blamed: \(m.handshakeFailures)")
    #expect(m.connectFailures.isEmpty, "the fallback is not a failed attempt: \(m.connectFailures)")
    await publisher.stop()
    await sink.stop()
  }

  @Test("MQTT 5 pinned: a typed protocol error naming the version, never a certificate refusal")
  func pinnedV5IsTyped() async throws {
    let f = try Fixture(commonName: "device-0401")
    let broker = try f.amqtt()
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.protocolVersion = .v5
    configuration.reconnect = quickReconnect
    configuration.connectTimeout = .seconds(5)
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    defer { client.stop() }
    do {
      try await client.connect(timeout: .seconds(30))
      Issue.record("an MQTT 5 client connected to a 3.1.1-only broker")
    } catch let error as MQTTError {
      // amqtt 0.12 misreads libmosquitto's MQTT 5 CONNECT and waits: no answer, no close.
      #expect(error.kind == .protocolVersionUnsupported || error.kind == .timedOut, "\(error)")
      #expect(error.reason.contains("accepted our certificate"), "\(error)")
      #expect(error.reason.contains("3.1.1"))
    } catch {
      Issue.record("expected an MQTTError, got \(error)")
    }
  }

  @Test("a certificate amqtt does not trust is reported as refused by the server, at the TLS layer")
  func untrustedCertificateIsStillARefusal() async throws {
    let f = try Fixture(commonName: "device-0402")
    let broker = try f.amqtt(clientCA: try TestCA(name: "Another Device CA").certificatePEM)
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    defer { client.stop() }
    do {
      try await client.connect(timeout: .seconds(30))
      Issue.record("connected with a certificate the broker does not trust")
    } catch let error as TLSError {
      // The alert, when it arrives before the reset; else the ambiguous end, which is transient.
      #expect(error.layer == .rejectedByServer || error.code == .closedAfterOurCertificate, "\(error)")
    } catch {
      Issue.record("expected a TLSError, got \(error)")
    }
    // Whichever it was, it keeps happening: the client ends up on the refusal schedule.
    for await state in client.stateChanges {
      if case .waiting(let retryIn, _) = state, retryIn >= configuration.reconnect.refusedInitialDelay / 2 { break }
    }
    #expect(client.metrics.protocolFallbacks == 0)
  }
}
