import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

@Suite("mutual TLS with a TPM-held key against openssl s_server")
struct HandshakeTests {
  struct Case: CustomStringConvertible, Sendable {
    var algorithm: KeyAlgorithm
    var version: TLSVersion
    var serverArguments: [String]
    var description: String { "\(algorithm) \(version == .tls13 ? "TLS 1.3" : "TLS 1.2") \(serverArguments)" }
  }

  static let cases: [Case] = [
    Case(algorithm: .eccP256, version: .tls13, serverArguments: ["-tls1_3"]),
    Case(algorithm: .eccP256, version: .tls12, serverArguments: ["-tls1_2"]),
    Case(algorithm: .eccP384, version: .tls13, serverArguments: ["-tls1_3"]),
    Case(algorithm: .eccP384, version: .tls12, serverArguments: ["-tls1_2"]),
    // RSA: TLS 1.3 signs RSA-PSS; TLS 1.2 PKCS#1 v1.5 when the server asks only for that, else PSS.
    Case(algorithm: .rsa2048, version: .tls13, serverArguments: ["-tls1_3"]),
    Case(
      algorithm: .rsa2048, version: .tls12,
      serverArguments: ["-tls1_2", "-client_sigalgs", "rsa_pkcs1_sha256:ecdsa_secp256r1_sha256"]),
    Case(algorithm: .rsa2048, version: .tls12, serverArguments: ["-tls1_2", "-client_sigalgs", "rsa_pss_rsae_sha256"]),
  ]

  @Test("the handshake completes, the server sees our subject, and it costs one TPM command", arguments: cases)
  func handshake(_ c: Case) throws {
    let f = try Fixture(c.algorithm, commonName: "device-\(c.algorithm.rawValue)")
    let server = try f.server(c.serverArguments)
    let context = try f.context()
    // The first handshake loads the key (SRK + TPM2_Load); every later one is TPM2_Sign alone.
    _ = try f.fetchPage(context, port: server.port)
    for _ in 0..<3 {
      let before = f.tpm.commandCount
      let (page, connection) = try f.fetchPage(context, port: server.port)
      #expect(f.tpm.commandCount - before == 1, "TPM commands in one handshake")
      #expect(page.contains("Client certificate"))
      #expect(page.contains("Subject: CN=device-\(c.algorithm.rawValue)"))
      let expectedType =
        (c.algorithm == .rsa2048 || c.algorithm == .rsa3072)
        ? (c.serverArguments.contains("rsa_pkcs1_sha256:ecdsa_secp256r1_sha256") ? "RSA" : "RSA-PSS") : "ECDSA"
      #expect(page.contains("Peer signature type: \(expectedType)\n"))
      #expect(connection.protocolVersion == (c.version == .tls13 ? "TLSv1.3" : "TLSv1.2"))
    }
    #expect(f.key.loadCount == 1)
  }

  // Serialized: the pcap TCTI keeps one recording per process, named by the environment.
  @Test(
    "an independent recorder (the pcap TCTI) sees exactly one TPM command, TPM2_Sign, per handshake",
    .serialized, arguments: [TLSVersion.tls12, .tls13])
  func pcapCountsOneCommand(_ version: TLSVersion) throws {
    let file = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-\(UUID().uuidString).pcap")
    defer { try? FileManager.default.removeItem(at: file) }
    // tpm2-tss's pcap TCTI takes its file from the environment when it is first opened.
    setenv("TCTI_PCAP_FILE", file.path, 1)
    let f = try Fixture(tctiPrefix: "pcap:")
    let server = try f.server([version == .tls13 ? "-tls1_3" : "-tls1_2"])
    let context = try f.context(maximumVersion: version)
    _ = try f.fetchPage(context, port: server.port)  // loads the key
    let before = try PcapRecord.commands(in: file)
    let handshakes = 5
    for _ in 0..<handshakes { _ = try f.fetchPage(context, port: server.port) }
    let after = try PcapRecord.commands(in: file)
    let during = Array(after.dropFirst(before.count))
    #expect(during.count == handshakes, "commands recorded: \(during.map { String($0, radix: 16) })")
    #expect(during.allSatisfy { $0 == PcapRecord.sign })
  }
}
