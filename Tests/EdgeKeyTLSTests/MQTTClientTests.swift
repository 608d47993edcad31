import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// Collects `count` messages, or fails after `seconds`.
func collect(_ count: Int, from client: MQTTClient, within seconds: Double = 10) async throws -> [MQTTMessage] {
  try await withThrowingTaskGroup(of: [MQTTMessage].self) { group in
    group.addTask {
      var got: [MQTTMessage] = []
      for await message in client.messages {
        got.append(message)
        if got.count == count { break }
      }
      return got
    }
    group.addTask {
      try await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
      throw HarnessError("timed out waiting for \(count) messages")
    }
    defer { group.cancelAll() }
    return try await group.next() ?? []
  }
}

@Suite("MQTT over mutual TLS with the TPM key (libmosquitto, mosquitto with require_certificate)")
struct MQTTClientTests {
  @Test(
    "publish and subscribe round trip at every QoS, MQTT 3.1.1 and 5",
    arguments: [MQTTProtocolVersion.v311, .v5], [MQTTQoS.atMostOnce, .atLeastOnce, .exactlyOnce])
  func roundTrip(_ version: MQTTProtocolVersion, _ qos: MQTTQoS) async throws {
    let f = try Fixture(commonName: "device-0100")
    let serverCert = try f.ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: f.ca.certificatePEM)
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.protocolVersion = version
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    try await f.key.load()
    let before = f.tpm.commandCount
    try await client.connect()
    #expect(f.tpm.commandCount - before == 1, "one TPM2_Sign for the whole connection")
    #expect(client.isConnected)
    #expect(try await client.subscribe("devices/device-0100/#", qos: .exactlyOnce) == .exactlyOnce)
    for i in 0..<3 {
      try await client.publish(topic: "devices/device-0100/telemetry", payload: Array("reading \(i)".utf8), qos: qos)
    }
    let got = try await collect(3, from: client)
    #expect(got.map { String(decoding: $0.payload, as: UTF8.self) } == ["reading 0", "reading 1", "reading 2"])
    #expect(got.allSatisfy { $0.topic == "devices/device-0100/telemetry" && $0.qos == qos })
    // The client id defaults to the certificate's common name; the broker saw it and our identity.
    #expect(broker.log.contains("as device-0100"))
    #expect(broker.log.contains("u'device-0100'"))
    client.disconnect()
  }
}
