import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// A session that outlives its connection (MQTT 5 §3.1.2.11.2, §4.1; 3.1.1 §3.1.2.4), and the
/// limits a broker's CONNACK sets (MQTT 5 §3.2.2.3).
@Suite("MQTT 5 sessions: CONNECT properties, offline delivery, the broker's CONNACK limits")
struct MQTT5SessionTests {
  struct ExpiryCase: Sendable, CustomStringConvertible {
    var cleanSession: Bool
    var sessionExpiry: Duration?
    var sent: UInt32?
    var description: String { "clean \(cleanSession), expiry \(sessionExpiry.map { "\($0)" } ?? "nil")" }
  }

  @Test(
    "the CONNECT on the wire carries the session expiry, receive maximum, packet size and user properties",
    arguments: [
      ExpiryCase(cleanSession: false, sessionExpiry: .seconds(600), sent: 600),
      ExpiryCase(cleanSession: false, sessionExpiry: nil, sent: UInt32.max),
      ExpiryCase(cleanSession: true, sessionExpiry: nil, sent: nil),
    ])
  func connectProperties(_ c: ExpiryCase) async throws {
    let f = try Fixture(commonName: "device-0500")
    let serverCert = try f.ca.issueServer()
    let capture = try ConnectCapture(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: f.ca.certificatePEM)
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: capture.port)
    configuration.protocolVersion = .v5
    configuration.cleanSession = c.cleanSession
    configuration.sessionExpiry = c.sessionExpiry
    configuration.receiveMaximum = 10
    configuration.maximumPacketSize = 65536
    configuration.connectUserProperties = [.init("site", "line-3"), .init("site", "spare"), .init("fw", "1.2")]
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    try await client.connect()
    // Read by the peer (Python's ssl module), not by libmosquitto: what really went out.
    let connect = try #require(capture.connect.flatMap(ConnectPacket.init))
    #expect(connect.level == 5)
    #expect(connect.cleanStart == c.cleanSession)
    #expect(connect.sessionExpiry == c.sent)
    #expect(connect.receiveMaximum == 10)
    #expect(connect.maximumPacketSize == 65536)
    #expect(connect.userProperties.map(\.0) == ["site", "site", "fw"])
    #expect(connect.userProperties.map(\.1) == ["line-3", "spare", "1.2"])
    #expect(connect.clientID == "device-0500")
    #expect(connect.keepAlive == 60)
    // The peer's CONNACK: properties mosquitto never sends, read whole and in order.
    let connack = try #require(client.connack)
    #expect(connack.userProperties == [.init("broker", "capture"), .init("broker", "twice")])
    #expect(connack.topicAliasMaximum == 9)
    #expect(!connack.sessionPresent)
    #expect(connack.sessionExpiry == c.sent.map { .seconds(Int64($0)) })
    await client.stop()
  }

  @Test("CONNECT settings outside the protocol's ranges are refused before any connection")
  func invalidSettings() throws {
    let f = try Fixture()
    let tls = try f.context(serverName: "127.0.0.1")
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: 1)
    configuration.sessionExpiry = .milliseconds(1500)
    #expect(throws: MQTTError.self) { try MQTTClient(configuration, tls: tls) }
    configuration.sessionExpiry = .seconds(Int64(UInt32.max) + 1)
    #expect(throws: MQTTError.self) { try MQTTClient(configuration, tls: tls) }
    configuration.sessionExpiry = .seconds(Int64(UInt32.max))
    _ = try MQTTClient(configuration, tls: tls)
    configuration.receiveMaximum = 0
    #expect(throws: MQTTError.self) { try MQTTClient(configuration, tls: tls) }
    configuration.receiveMaximum = nil
    configuration.maximumPacketSize = 0
    #expect(throws: MQTTError.self) { try MQTTClient(configuration, tls: tls) }
    configuration.maximumPacketSize = nil
    configuration.connectUserProperties = [.init("a\u{0}b", "c")]
    #expect(throws: MQTTError.self) { try MQTTClient(configuration, tls: tls) }
  }

  /// Subscribes with a persistent session, leaves, has three QoS 1 commands sent while away,
  /// comes back; returns the commands that arrived (a marker published after the return ends
  /// the wait: a kept session delivers its queue before it).
  func offlineDelivery(
    _ f: Fixture, port: UInt16, version: MQTTProtocolVersion, sessionExpiry: Duration?, id: String
  ) async throws -> (commands: Set<String>, sessionPresent: Bool?) {
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: port)
    configuration.protocolVersion = version
    configuration.cleanSession = false
    configuration.sessionExpiry = sessionExpiry
    configuration.reconnect = quickReconnect
    let tls = try f.context(serverName: "127.0.0.1")
    let topic = "devices/\(id)/commands"
    let device = try MQTTClient(configuration, tls: tls)
    try await device.connect()
    _ = try await device.subscribe(topic, qos: .atLeastOnce)
    await device.stop()

    var senderConfiguration = MQTTConfiguration(host: "127.0.0.1", port: port)
    senderConfiguration.protocolVersion = .v311
    let sender = try MQTTClient(senderConfiguration, tls: try f.softwareParty("ops-\(id)"))
    try await sender.connect()
    for i in 0..<3 { try await sender.publish(topic: topic, payload: Array("command \(i)".utf8)) }

    let back = try MQTTClient(configuration, tls: tls)
    try await back.connect()
    _ = try await back.subscribe(topic, qos: .atLeastOnce)
    try await sender.publish(topic: topic, payload: Array("marker".utf8))
    let (got, _) = await drain(back, expecting: ["marker"], within: 30)
    let present = back.connack?.sessionPresent
    await back.stop()
    await sender.stop()
    #expect(got.contains("marker"), "the marker never arrived: \(got)")
    return (got.subtracting(["marker"]), present)
  }

  @Test(
    "QoS 1 commands sent while a persistent session was away arrive when it comes back (mosquitto)",
    arguments: [MQTTProtocolVersion.v5, .v311])
  func offlineDeliveryMosquitto(_ version: MQTTProtocolVersion) async throws {
    let f = try Fixture(commonName: "device-0501")
    let broker = try f.broker()
    let sessionExpiry: Duration? = version == .v5 ? .seconds(300) : nil
    let (commands, present) = try await offlineDelivery(
      f, port: broker.port, version: version, sessionExpiry: sessionExpiry, id: "device-0501")
    #expect(commands == ["command 0", "command 1", "command 2"], "MQTT \(version): \(commands.sorted())")
    #expect(present == true)
  }

  @Test("an MQTT 5 session with expiry 0 ends with its connection: nothing is kept for it (the control)")
  func zeroExpiryKeepsNothing() async throws {
    let f = try Fixture(commonName: "device-0502")
    let broker = try f.broker()
    let (commands, present) = try await offlineDelivery(
      f, port: broker.port, version: .v5, sessionExpiry: .zero, id: "device-0502")
    #expect(commands.isEmpty, "\(commands.sorted())")
    #expect(present == false)
  }

  @Test("QoS 1 commands sent while a 3.1.1 persistent session was away arrive (amqtt, a second broker)")
  func offlineDeliveryAMQTT() async throws {
    let f = try Fixture(commonName: "device-0503")
    let broker = try f.amqtt()
    let (commands, present) = try await offlineDelivery(
      f, port: broker.port, version: .v311, sessionExpiry: nil, id: "device-0503")
    #expect(commands == ["command 0", "command 1", "command 2"], "\(commands.sorted())")
    #expect(present == true)
  }

  @Test(
    "mosquitto's CONNACK limits are read and kept to: keep alive, receive maximum, QoS, retain, packet size, assigned id"
  )
  func brokerLimits() async throws {
    let f = try Fixture(commonName: "device-0504")
    let serverCert = try f.ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: f.ca.certificatePEM,
      extraConfig: [
        "max_keepalive 20", "max_inflight_messages 5", "max_qos 1", "retain_available false",
        "max_packet_size 2000", "max_topic_alias 3",
      ])
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port, clientID: "")
    configuration.protocolVersion = .v5
    configuration.keepAlive = .seconds(60)
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    try await client.connect()
    let connack = try #require(client.connack)
    #expect(connack.version == .v5)
    #expect(connack.keepAlive == .seconds(20), "the broker's Server Keep Alive is the one in force")
    #expect(connack.receiveMaximum == 5)
    #expect(connack.maximumQoS == .atLeastOnce)
    #expect(!connack.retainAvailable)
    #expect(connack.maximumPacketSize == 2000)
    #expect(connack.topicAliasMaximum == 3)
    #expect(connack.assignedClientID)
    #expect(!connack.clientID.isEmpty)

    // Above the broker's maximum QoS or too large: refused, counted, never retried.
    let refused: [(String, MQTTQoS, Int)] = [("qos 2", .exactlyOnce, 10), ("large", .atLeastOnce, 3000)]
    for (name, qos, size) in refused {
      let error = await #expect(throws: MQTTError.self, "\(name)") {
        try await client.publish(topic: "devices/device-0504/t", payload: [UInt8](repeating: 65, count: size), qos: qos)
      }
      #expect(error?.kind == .dropped, "\(name): \(String(describing: error))")
    }
    // Retained where the broker keeps none: sent without the flag (a retained PUBLISH would be
    // a protocol error, 0x9A), so the broker accepts it and keeps the connection.
    try await client.publish(topic: "devices/device-0504/t", payload: Array("status".utf8), retain: true)
    try await client.publish(topic: "devices/device-0504/t", payload: Array("within the limits".utf8))
    #expect(client.metrics.messagesDropped["unsendable"] == 2)
    #expect(client.outbox.count == 0)
    #expect(client.metrics.connections == 1, "kept to the limits: the broker never had to disconnect us")

    // The next connection sends the id the broker assigned, so the session is the same one.
    let assigned = connack.clientID
    client.replaceCredentials(client.tls, reconnect: true)
    for await state in client.stateChanges {
      if case .connected = state, client.metrics.connections >= 2 { break }
    }
    #expect(client.connack?.clientID == assigned)
    #expect(client.connack?.assignedClientID == false)
    #expect(broker.log.contains("as \(assigned)"))
    await client.stop()
  }
}
