import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// The negative matrix of the mTLS guide: each failure with its own typed error, naming the
/// layer and the certificate at fault.
@Suite("mTLS failures are typed and name the layer and certificate")
struct NegativeTests {
  @Test("unknown CA: the server's chain ends in a root we do not trust")
  func unknownCA() throws {
    let f = try Fixture()
    let otherRoot = try TestCA(name: "Somebody Else's Root")
    let otherIssuing = try otherRoot.intermediate(name: "Somebody Else's Issuing CA")
    // The server sends its leaf and the unknown issuing CA; the chain ends outside our anchors.
    let server = try f.server(issuer: otherIssuing)
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.layer == .serverCertificate)
    #expect(error?.code == .issuerNotFound || error?.code == .untrustedRoot)
    #expect(error?.certificate?.issuer.contains("Somebody Else") == true)
    #expect(error?.description.contains("server certificate") == true)
  }

  @Test("a self-signed server certificate from an unknown root")
  func selfSignedUnknownRoot() throws {
    let f = try Fixture()
    let stranger = try TestCA(name: "localhost")
    let server = try OpenSSLServer(
      certificatePEM: stranger.certificatePEM, keyPEM: TestCA.privateKeyPEM(stranger.key),
      clientCAPEM: f.ca.certificatePEM)
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.layer == .serverCertificate)
    #expect(error?.code == .untrustedRoot)
  }

  @Test("missing intermediate: the server does not send the issuing CA")
  func missingIntermediate() throws {
    let f = try Fixture()
    let issuing = try f.ca.intermediate()
    let withChain = try f.server(issuer: issuing, sendChain: true)
    _ = try f.fetchPage(try f.context(), port: withChain.port)  // the same PKI works with the chain
    let server = try f.server(issuer: issuing, sendChain: false)
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.layer == .serverCertificate)
    #expect(error?.code == .issuerNotFound)
    #expect(error?.depth == 0)
    #expect(error?.certificate?.issuer == "CN=EdgeKey Test Issuing CA")
    #expect(error?.reason.contains("missing intermediate") == true)
  }

  @Test("the server's certificate has expired")
  func serverExpired() throws {
    let f = try Fixture()
    let server = try f.server(validFrom: -2 * 86400, validFor: 86400)
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.layer == .serverCertificate)
    #expect(error?.code == .serverCertificateExpired)
    #expect(error?.certificate?.subject == "CN=localhost")
    #expect(error?.certificate?.notAfter.isEmpty == false)
  }

  @Test("the server's certificate is not yet valid")
  func serverNotYetValid() throws {
    let f = try Fixture()
    let server = try f.server(validFrom: 86400, validFor: 86400)
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.code == .serverCertificateNotYetValid)
  }

  @Test("the server's certificate names another host; an IP literal is checked as an IP")
  func wrongHostName() throws {
    let f = try Fixture()
    let server = try f.server(subjectAlternativeNames: ["DNS:broker.example.com", "IP:10.0.0.1"])
    let byName = tlsError {
      _ = try f.fetchPage(try f.context(serverName: "localhost"), port: server.port)
    }
    #expect(byName?.code == .nameMismatch)
    #expect(byName?.reason.contains("localhost") == true)
    let byIP = tlsError {
      _ = try f.fetchPage(try f.context(serverName: "127.0.0.1"), port: server.port, host: "127.0.0.1")
    }
    #expect(byIP?.code == .nameMismatch)
    // The right name passes even though we connect to 127.0.0.1.
    _ = try f.fetchPage(try f.context(serverName: "broker.example.com"), port: server.port, host: "127.0.0.1")
  }

  @Test("a server certificate without serverAuth, or without any EKU, is refused", arguments: ["clientAuth", nil])
  func serverWithoutServerAuth(_ eku: String?) throws {
    let f = try Fixture()
    let server = try f.server(extendedKeyUsage: eku)
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.layer == .serverCertificate)
    #expect(error?.code == .notForServerAuth)
  }

  @Test("a revoked server certificate is refused when a CRL is given")
  func serverRevoked() throws {
    let f = try Fixture()
    let cert = try f.ca.issueServer()
    let server = try OpenSSLServer(
      certificatePEM: cert.certificate, keyPEM: cert.key, clientCAPEM: f.ca.certificatePEM)
    _ = try f.fetchPage(try f.context(crl: try f.ca.crl(revoking: [])), port: server.port)
    let error = tlsError {
      _ = try f.fetchPage(try f.context(crl: try f.ca.crl(revoking: [cert.serial])), port: server.port)
    }
    #expect(error?.code == .revoked)
  }

  @Test(
    "the server refuses our certificate: revoked, or from a CA it does not trust", arguments: ["-tls1_3", "-tls1_2"])
  func serverRefusesUs(_ version: String) throws {
    let f = try Fixture()
    let crlFile = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-crl-\(UUID().uuidString).pem")
    defer { try? FileManager.default.removeItem(at: crlFile) }
    try f.ca.crl(revoking: [f.clientSerial]).write(to: crlFile, atomically: true, encoding: .utf8)
    let revoking = try f.server([version, "-CRL", crlFile.path, "-crl_check"])
    let revoked = tlsError { _ = try f.fetchPage(try f.context(), port: revoking.port) }
    #expect(revoked?.layer == .rejectedByServer)
    #expect(revoked?.code == .alert(44))  // certificate_revoked
    #expect(revoked?.certificate?.subject == "CN=device-0001")

    let otherCA = try TestCA(name: "Another Device CA")
    let distrusting = try f.server([version], clientCA: otherCA.certificatePEM)
    let unknown = tlsError { _ = try f.fetchPage(try f.context(), port: distrusting.port) }
    #expect(unknown?.layer == .rejectedByServer)
    #expect(unknown?.code == .alert(48))  // unknown_ca
  }

  @Test("a server that speaks only TLS 1.1 fails at the protocol layer")
  func tls11Server() throws {
    let f = try Fixture()
    let server = try f.server(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
    let error = tlsError { _ = try f.fetchPage(try f.context(), port: server.port) }
    #expect(error?.layer == .protocol)
  }

  @Test("our certificate without clientAuth is refused before connecting")
  func clientWithoutClientAuth() throws {
    let f = try Fixture(clientEKU: "serverAuth")
    let error = tlsError { _ = try f.context() }
    #expect(error?.layer == .clientCertificate)
    #expect(error?.code == .missingClientAuth)
    #expect(error?.certificate?.subject == "CN=device-0001")
  }

  @Test("our certificate expired or not yet valid is refused before connecting")
  func clientDates() throws {
    let f = try Fixture()
    let expired = try f.ca.issueClient(
      publicKeyDER: f.key.publicKey.spki, commonName: "device-0001", validFrom: -2 * 86400, validFor: 86400)
    #expect(tlsError { _ = try f.context(chainPEM: expired.certificate) }?.code == .certificateExpired)
    let early = try f.ca.issueClient(
      publicKeyDER: f.key.publicKey.spki, commonName: "device-0001", validFrom: 86400, validFor: 86400)
    let error = tlsError { _ = try f.context(chainPEM: early.certificate) }
    #expect(error?.code == .certificateNotYetValid)
    #expect(error?.reason.contains("clock") == true)
  }

  @Test("a certificate for another key is refused before connecting")
  func certificateForAnotherKey() throws {
    let f = try Fixture()
    let other = try f.tpm.loadKey(try f.tpm.createKey())
    let issued = try f.ca.issueClient(publicKeyDER: other.publicKey.spki, commonName: "device-0001")
    let error = tlsError { _ = try f.context(chainPEM: issued.certificate) }
    #expect(error?.layer == .clientCertificate)
    #expect(error?.code == .certificateKeyMismatch)
  }

  @Test("a TPM that is gone fails the handshake at the TPM layer")
  func tpmGone() throws {
    let f = try Fixture()
    let server = try f.server()
    let context = try f.context()
    f.swtpm.stop()
    let error = tlsError { _ = try f.fetchPage(context, port: server.port) }
    #expect(error?.layer == .tpm)
    #expect(error?.reason.contains("TPM2_Sign") == true || error?.reason.contains("TPM") == true)
  }

  @Test("nothing listening fails at the network layer")
  func networkRefused() throws {
    let f = try Fixture()
    let port = try PortFinder.free()
    let error = tlsError { _ = try TLSConnection(context: try f.context(), host: "127.0.0.1", port: port) }
    #expect(error?.layer == .network)
  }

  @Test("a server that accepts TCP and never answers the ClientHello times out at the network layer")
  func silentServer() throws {
    // A listening socket nobody accepts on: the kernel completes the TCP handshake, nothing
    // answers TLS. (The EAGAIN of the socket timeout reaches us as SSL_ERROR_WANT_READ; it was
    // reported as "unknown TLS failure" at the TLS layer.)
    let f = try Fixture()
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(listener) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(listener, $0, length) == 0 && listen(listener, 4) == 0 && getsockname(listener, $0, &length) == 0
      }
    }
    try #require(bound)
    let port = UInt16(bigEndian: address.sin_port)
    let error = tlsError {
      _ = try TLSConnection(context: try f.context(), host: "127.0.0.1", port: port, timeout: .milliseconds(300))
    }
    #expect(error?.layer == .network, "\(String(describing: error))")
    #expect(error?.code == .timedOut, "\(String(describing: error))")
  }

  @Test("configuration errors: no trust anchor, no server name, damaged chain")
  func configuration() throws {
    let f = try Fixture()
    #expect(tlsError { _ = try f.context(trust: "") }?.code == .noTrustAnchor)
    #expect(tlsError { _ = try f.context(serverName: "") }?.code == .noServerName)
    #expect(
      tlsError { _ = try Certificate.chain(pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n") }?
        .code == .badCertificateChain)
  }
}
