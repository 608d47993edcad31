import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// What other implementations rely on: revocation checked at every level of the chain, SNI as
/// RFC 6066 says, ALPN, and which extended key usages each kind of server may show.
@Suite("TLS policy against outside peers: CRLs for the whole chain, SNI, ALPN, EKU")
struct TLSPolicyTests {
  @Test("a root CRL that revokes the intermediate fails the chain (as openssl verify -crl_check_all does)")
  func revokedIntermediate() throws {
    let f = try Fixture()
    let issuing = try f.ca.intermediate()
    let server = try f.server(issuer: issuing)
    let rootClean = try f.ca.crl(revoking: [])
    let rootRevoking = try f.ca.crl(revoking: [issuing.serialNumber])
    let issuingClean = try issuing.crl(revoking: [])
    _ = try f.fetchPage(try f.context(crl: rootClean + issuingClean), port: server.port)
    let revoked = tlsError { _ = try f.fetchPage(try f.context(crl: rootRevoking + issuingClean), port: server.port) }
    #expect(revoked?.layer == .serverCertificate)
    #expect(revoked?.code == .revoked)
    #expect(revoked?.depth == 1)
    #expect(revoked?.certificate?.subject == "CN=EdgeKey Test Issuing CA")

    // The independent verifier says the same of the same chain and CRLs.
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-crl-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let leaf = try issuing.issueServer()
    func file(_ name: String, _ text: String) throws -> String {
      let url = dir.appendingPathComponent(name)
      try text.write(to: url, atomically: true, encoding: .utf8)
      return url.path
    }
    let args = [
      "verify", "-crl_check_all", "-CAfile", try file("root.pem", f.ca.certificatePEM), "-untrusted",
      try file("issuing.pem", issuing.certificatePEM), "-CRLfile",
      try file("crls.pem", rootRevoking + issuingClean), try file("leaf.pem", leaf.certificate),
    ]
    let verdict = try Command.runCapturing("openssl", args)
    #expect(verdict.status != 0)
    #expect((verdict.stdout + verdict.stderr).contains("certificate revoked"))
  }

  @Test("a level of the chain without a CRL: refused by default, passes when the policy allows it")
  func levelWithoutCRL() throws {
    let f = try Fixture()
    let issuing = try f.ca.intermediate()
    let server = try f.server(issuer: issuing)
    let rootClean = try f.ca.crl(revoking: [])
    let missing = tlsError { _ = try f.fetchPage(try f.context(crl: rootClean), port: server.port) }
    #expect(missing?.code == .crlUnavailable)
    #expect(missing?.depth == 0)
    #expect(missing?.reason.contains("no CRL from this certificate's issuer") == true)
    _ = try f.fetchPage(try f.context(crl: rootClean, missingCRL: .allow), port: server.port)
    // Allowing a missing level still checks the levels that have one.
    let revoked = tlsError {
      _ = try f.fetchPage(
        try f.context(crl: try f.ca.crl(revoking: [issuing.serialNumber]), missingCRL: .allow), port: server.port)
    }
    #expect(revoked?.code == .revoked)
  }

  @Test("SNI is the verified host name and never an IP literal, on the TLSConnection and libmosquitto paths")
  func serverNameIndication() throws {
    let f = try Fixture()
    func viaConnection(_ name: String) throws -> String? {
      let capture = try ClientHelloCapture()
      _ = try? TLSConnection(
        context: try f.context(serverName: name), host: "127.0.0.1", port: capture.port, timeout: .seconds(5))
      return try capture.hello().serverName
    }
    func viaMosquitto(_ name: String) throws -> String? {
      let capture = try ClientHelloCapture()
      let client = try MQTTClient(
        MQTTConfiguration(host: "127.0.0.1", port: capture.port), tls: try f.context(serverName: name))
      client.start()
      defer { client.stop() }
      return try capture.hello().serverName
    }
    #expect(try viaConnection("127.0.0.1") == nil)
    #expect(try viaConnection("broker.example.com") == "broker.example.com")
    // libmosquitto sets its host (an IP here) as SNI; the context replaces it.
    #expect(try viaMosquitto("127.0.0.1") == nil)
    #expect(try viaMosquitto("localhost") == "localhost")
  }

  @Test("ALPN: the policy's protocols are offered and the server's choice is known (s_server -alpn)")
  func applicationProtocols() throws {
    let f = try Fixture()
    let server = try f.server(["-alpn", "x-amzn-mqtt-ca"])
    // One connection at a time: s_server serves the next once the last one is closed.
    #expect(
      try f.fetchPage(try f.context(alpn: ["x-amzn-mqtt-ca"]), port: server.port).connection.alpnProtocol
        == "x-amzn-mqtt-ca")
    #expect(try f.fetchPage(try f.context(), port: server.port).connection.alpnProtocol == nil)
    // On the libmosquitto path too, seen on the wire.
    let capture = try ClientHelloCapture()
    let client = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: capture.port),
      tls: try f.context(serverName: "127.0.0.1", alpn: ["x-amzn-mqtt-ca", "mqtt"]))
    client.start()
    defer { client.stop() }
    #expect(try capture.hello().alpn == ["x-amzn-mqtt-ca", "mqtt"])
    let bad = tlsError { _ = try f.context(alpn: [""]) }
    #expect(bad?.layer == .configuration)
  }

  @Test("an id-kp-cmcRA server certificate passes where allowed (EST) and not for a broker; no EKU only when asked")
  func serverExtendedKeyUsage() throws {
    let f = try Fixture()
    let raServer = try f.server(extendedKeyUsage: "1.3.6.1.5.5.7.3.28")
    _ = try f.fetchPage(try f.context(acceptCMCRA: true), port: raServer.port)
    let broker = tlsError { _ = try f.fetchPage(try f.context(), port: raServer.port) }
    #expect(broker?.code == .notForServerAuth)
    let noEKU = try f.server(extendedKeyUsage: nil)
    let strict = tlsError { _ = try f.fetchPage(try f.context(acceptCMCRA: true), port: noEKU.port) }
    #expect(strict?.code == .notForServerAuth)
    _ = try f.fetchPage(try f.context(requireServerAuth: false, acceptCMCRA: true), port: noEKU.port)
    // An EKU for other purposes only is refused even then.
    let clientOnly = try f.server(extendedKeyUsage: "clientAuth")
    let wrong = tlsError {
      _ = try f.fetchPage(try f.context(requireServerAuth: false, acceptCMCRA: true), port: clientOnly.port)
    }
    #expect(wrong?.code == .notForServerAuth)
  }
}
