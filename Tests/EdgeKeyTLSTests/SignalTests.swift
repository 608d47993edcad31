import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// Whether SIGPIPE has its default disposition (the process dies on a write to a closed peer).
func sigpipeIsDefault() -> Bool {
  var action = sigaction()
  sigaction(SIGPIPE, nil, &action)
  return action.__sigaction_handler.sa_handler == nil
}

@Suite("Library code leaves the process's signals alone")
struct SignalTests {
  /// In a process of its own (an exit test), where SIGPIPE keeps its default: a write that
  /// raised it would kill the process, and the test would see the signal instead of success.
  @Test("SIGPIPE stays at its default through TLS and MQTT use, and a peer gone mid-write is an error, not a death")
  func sigpipeUntouched() async {
    await #expect(processExitsWith: .success) {
      let f = try Fixture(commonName: "device-0600")
      var server: OpenSSLServer? = try f.server(["-tls1_3"])
      let broker = try f.broker()
      let context = try f.context(resumesSessions: false)
      let mqttContext = try f.context(serverName: "127.0.0.1")
      signal(SIGPIPE, SIG_DFL)  // the harness ignores it for its own helpers; the library must not need it

      // s_server gone after its page (its process stopped): writing on hits a closed peer
      // (a reset, then EPIPE).
      let (_, connection) = try f.fetchPage(context, port: server!.port)
      server = nil
      var refused = false
      for _ in 0..<64 {
        do { try connection.write([UInt8](repeating: 65, count: 16384)) } catch {
          refused = true
          break
        }
      }
      #expect(refused, "writes to a closed peer never failed")
      #expect(sigpipeIsDefault())

      // libmosquitto's mosquitto_new ignores SIGPIPE for the process: not through EdgeKey.
      var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
      configuration.reconnect = quickReconnect
      let client = try MQTTClient(configuration, tls: mqttContext)
      try await client.connect()
      #expect(sigpipeIsDefault(), "mosquitto_new's SIGPIPE ignore was not undone")
      #expect(client.writesWithoutSIGPIPE, "libmosquitto's SSL still writes with a plain socket BIO")
      try await client.publish(topic: "devices/device-0600/t", payload: [1])
      // The broker gone: the connection's next writes go to a closed peer.
      broker.kill9()
      for i in 0..<200 {
        _ = try? await client.enqueue([
          MQTTMessage(topic: "devices/device-0600/t", payload: [UInt8](repeating: UInt8(i % 256), count: 4096))
        ])
      }
      for await state in client.stateChanges {
        if case .waiting = state { break }
      }
      await client.stop()
      #expect(sigpipeIsDefault())
    }
  }
}
