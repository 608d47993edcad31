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
    let context = try f.context(resumesSessions: false)  // resumption has a test of its own
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
    let context = try f.context(maximumVersion: version, resumesSessions: false)
    _ = try f.fetchPage(context, port: server.port)  // loads the key
    let before = try PcapRecord.commands(in: file)
    let handshakes = 5
    for _ in 0..<handshakes { _ = try f.fetchPage(context, port: server.port) }
    let after = try PcapRecord.commands(in: file)
    let during = Array(after.dropFirst(before.count))
    #expect(during.count == handshakes, "commands recorded: \(during.map { String($0, radix: 16) })")
    #expect(during.allSatisfy { $0 == PcapRecord.sign })

    // Resumption on: the first handshake of a new context signs, each resumed one sends nothing
    // to the TPM at all.
    let resuming = try f.context(maximumVersion: version)
    #expect(try !f.resumes(resuming, port: server.port))
    let resumedBefore = try PcapRecord.commands(in: file)
    for _ in 0..<handshakes {
      let visit = try f.visit(resuming, port: server.port)
      let reused = visit.page.contains("Reused")  // s_server's own word for it
      #expect(visit.resumed)
      #expect(reused)
    }
    let resumedAfter = try PcapRecord.commands(in: file)
    #expect(Array(resumedBefore.dropFirst(during.count + before.count)) == [PcapRecord.sign], "the first handshake")
    #expect(resumedAfter.count == resumedBefore.count, "resumed handshakes sent TPM commands")
  }

  @Test(
    "a resumed handshake costs no TPM command; a forgotten session, another endpoint or a new credential is a full one",
    arguments: [["-tls1_3"], ["-tls1_2"]])
  func resumption(_ serverArguments: [String]) throws {
    let f = try Fixture(commonName: "device-0700")
    let server = try f.server(serverArguments)
    let context = try f.context()
    #expect(try !f.resumes(context, port: server.port))  // loads the key and signs
    #expect(context.keptSessions >= 1, "the server's ticket was kept")
    for _ in 0..<3 {
      let before = f.tpm.commandCount
      let visit = try f.visit(context, port: server.port)
      #expect(f.tpm.commandCount == before, "TPM commands in a resumed handshake")
      #expect(visit.resumed)
      #expect(visit.acceptedUs)
      // The server still knows who we are: the identity of the session it issued.
      let named = visit.page.contains("Subject: CN=device-0700")
      #expect(named)
      #expect(visit.serverSubject?.contains("localhost") == true)
    }
    #expect(context.keptSessions <= 4, "at most four tickets per endpoint")

    // Forgotten: a full handshake, one signature.
    #expect(context.forgetSessions() >= 1)
    #expect(context.keptSessions == 0)
    var before = f.tpm.commandCount
    #expect(try !f.resumes(context, port: server.port))
    #expect(f.tpm.commandCount - before == 1)

    // Another endpoint (same name, another port) never gets this endpoint's tickets.
    let other = try f.server(serverArguments)
    before = f.tpm.commandCount
    #expect(try !f.resumes(context, port: other.port))
    #expect(f.tpm.commandCount - before == 1)
    before = f.tpm.commandCount
    #expect(try f.resumes(context, port: other.port))
    #expect(f.tpm.commandCount == before)

    // A new credential is a new context: its first connection is a full handshake with it.
    let renewed = try f.ca.issueClient(publicKeyDER: f.key.publicKey.spki, commonName: "device-0700-renewed")
    let next = try f.context(chainPEM: renewed.certificate)
    before = f.tpm.commandCount
    let visit = try f.visit(next, port: server.port)
    #expect(!visit.resumed)
    #expect(f.tpm.commandCount - before == 1)
    let renamed = visit.page.contains("Subject: CN=device-0700-renewed")
    #expect(renamed)

    // Off: nothing is kept, every handshake signs.
    let off = try f.context(resumesSessions: false)
    for _ in 0..<2 {
      before = f.tpm.commandCount
      #expect(try !f.resumes(off, port: server.port))
      #expect(f.tpm.commandCount - before == 1)
    }
    #expect(off.keptSessions == 0)

    // Past its age bound a session is dropped, not offered.
    let brief = try f.context(maximumSessionAge: .milliseconds(50))
    _ = try f.visit(brief, port: server.port)
    #expect(brief.keptSessions >= 1)
    Thread.sleep(forTimeInterval: 0.2)  // the bound itself is what is tested: 4 times over it
    before = f.tpm.commandCount
    #expect(try !f.resumes(brief, port: server.port))
    #expect(f.tpm.commandCount - before == 1)
  }

  @Test("concurrent handshakes with resumption on: all succeed, tickets are never shared, at most one sign each")
  func concurrentResumption() async throws {
    let f = try Fixture()
    let server = try f.server(["-tls1_3"])
    let context = try f.context()
    _ = try f.fetchPage(context, port: server.port)
    let before = f.tpm.commandCount
    let results = try await withThrowingTaskGroup(of: (failed: Int, resumed: Int).self) { group in
      for _ in 0..<8 {
        group.addTask {
          var failed = 0
          var resumed = 0
          for _ in 0..<5 {
            do {
              let visit = try f.visit(context, port: server.port)
              if !visit.page.contains("Subject: CN=device-0001") { failed += 1 }
              if visit.resumed { resumed += 1 }
            } catch {
              failed += 1
            }
          }
          return (failed, resumed)
        }
      }
      return try await group.reduce(into: (0, 0)) {
        $0.0 += $1.failed
        $0.1 += $1.resumed
      }
    }
    #expect(results.0 == 0)
    #expect(results.1 > 0, "no handshake resumed")
    // Each full handshake signed once; each resumed one not at all.
    #expect(f.tpm.commandCount - before == UInt64(40 - results.1))
    #expect(context.keptSessions <= 4)
  }
}
