import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

@Suite("EST client against the project's registration authority")
struct ESTClientTests {
  @Test("simpleenroll with a bootstrap password returns a checked chain for the TPM key")
  func enrollWithPassword() throws {
    let f = try EnrollmentFixture(extraArguments: ["--allow-san", "DNS:{name}.local", "--allow-san", "IP:10.0.0.7"])
    let key = try f.newKey()
    let csr = try f.request(key, names: [.dns("device-0001.local"), .ip("10.0.0.7")])
    let chain = try f.client().enroll(csr, authentication: EnrollmentFixture.password)
    #expect(chain.count == 1)
    #expect(chain[0].publicKeyDER == key.publicKey.spki)
    #expect(chain[0].subject == "CN=device-0001,O=EdgeKey Tests")
    #expect(Set(chain[0].subjectAlternativeNames) == [.dns("device-0001.local"), .ip("10.0.0.7")])
    #expect(chain[0].extendedKeyUsage == [.clientAuth])
    // The certificate works: a TLS context accepts it with the TPM key.
    _ = try TLSClientContext(
      certificateChain: chain, key: key,
      policy: TLSPolicy(trustAnchorsPEM: f.ca.certificatePEM, serverName: "localhost"))
    #expect(f.ra.issuanceLog.count == 1)
    #expect(f.ra.issuanceLog[0].contains("\"authenticatedBy\":\"shared password of device\""))
  }

  @Test("a wrong password is a typed 401 carrying the server's text, and nothing is issued")
  func wrongPassword() throws {
    let f = try EnrollmentFixture()
    let key = try f.newKey()
    #expect {
      try f.client().enroll(try f.request(key), authentication: .password(user: "device", password: "guess"))
    } throws: { error in
      guard let e = error as? EnrollmentError, case .server(401) = e.kind else { return false }
      return e.message.contains("unknown device or wrong secret")
    }
    #expect(f.ra.issuanceLog.isEmpty)
  }

  @Test("a bootstrap certificate whose key is in the TPM authenticates the first enrollment")
  func enrollWithBootstrapCertificate() throws {
    let manufacturer = try TestCA(name: "EdgeKey Test Manufacturer CA")
    let f = try EnrollmentFixture(password: nil, bootstrapCA: manufacturer)
    let bootstrapKey = try f.newKey()
    let bootstrapPEM = try manufacturer.issueClient(publicKeyDER: bootstrapKey.publicKey.spki, commonName: "serial-42")
      .certificate
    let bootstrap = try Certificate.chain(pem: bootstrapPEM)
    // The factory's manifest binds this bootstrap certificate to the name device-0001.
    let line = try JSONSerialization.data(
      withJSONObject: ["serial": "serial-42", "name": "device-0001", "bootstrapCertificate": bootstrapPEM])
    try f.ra.importManifest([String(decoding: line, as: UTF8.self)])
    let operationalKey = try f.newKey()
    let chain = try f.client().enroll(
      try f.request(operationalKey), authentication: .certificate(bootstrap, key: bootstrapKey))
    #expect(chain[0].publicKeyDER == operationalKey.publicKey.spki)
    #expect(f.ra.issuanceLog.first?.contains("bootstrap certificate CN=serial-42") == true)
    // Without it, the RA (no password configured) refuses.
    #expect {
      try f.client().enroll(try f.request(operationalKey), authentication: .none)
    } throws: { ($0 as? EnrollmentError)?.kind == .server(401) }
  }

  @Test("simplereenroll needs the current certificate and the same subject")
  func reenroll() throws {
    let f = try EnrollmentFixture()
    let first = try f.newKey()
    let current = try f.client().enroll(try f.request(first), authentication: EnrollmentFixture.password)
    first.unload()
    let next = try f.newKey()
    let renewed = try f.client().reenroll(try f.request(next), authentication: .certificate(current, key: first))
    #expect(renewed[0].publicKeyDER == next.publicKey.spki)
    #expect(renewed[0].serialNumber != current[0].serialNumber)
    #expect(f.ra.issuanceLog.last?.contains("simplereenroll") == true)

    // Another subject under the same certificate: 403.
    #expect {
      try f.client().reenroll(
        try f.request(next, commonName: "someone-else"), authentication: .certificate(renewed, key: next))
    } throws: { ($0 as? EnrollmentError)?.kind == .server(403) }
    // A password is not enough to re-enroll.
    #expect {
      try f.client().reenroll(try f.request(next), authentication: EnrollmentFixture.password)
    } throws: { ($0 as? EnrollmentError)?.kind == .configuration }
  }

  @Test("202 with Retry-After is waited through; beyond the bound it is a typed error")
  func pending() throws {
    let f = try EnrollmentFixture(extraArguments: ["--pending", "2", "--retry-after", "1"])
    let key = try f.newKey()
    let start = Date()
    let chain = try f.client().enroll(try f.request(key), authentication: EnrollmentFixture.password)
    #expect(chain[0].publicKeyDER == key.publicKey.spki)
    #expect(Date().timeIntervalSince(start) >= 2)

    let other = try f.newKey()
    var impatient = ESTOptions()
    impatient.maximumPendingWait = .seconds(1)
    #expect {
      try f.client(options: impatient).enroll(try f.request(other), authentication: EnrollmentFixture.password)
    } throws: { ($0 as? EnrollmentError)?.kind == .pendingTooLong }
  }

  @Test("cacerts, and a first trust anchor bootstrapped only through a pinned fingerprint")
  func caCertificatesAndPin() throws {
    let f = try EnrollmentFixture()
    let published = try f.client().caCertificates()
    #expect(published.map(\.fingerprint) == [try f.anchors[0].fingerprint])

    let server = try ESTServer(url: f.ra.url)
    let fingerprint = try f.anchors[0].fingerprint
    let colons = stride(from: 0, to: 64, by: 2).map { i -> String in
      let a = fingerprint.index(fingerprint.startIndex, offsetBy: i)
      return String(fingerprint[a...fingerprint.index(after: a)]).uppercased()
    }.joined(separator: ":")
    let pinned = try ESTClient.bootstrapCACertificates(server: server, pinnedFingerprint: colons)
    #expect(pinned.anchor.fingerprint == fingerprint)

    #expect {
      try ESTClient.bootstrapCACertificates(server: server, pinnedFingerprint: String(repeating: "ab", count: 32))
    } throws: { ($0 as? EnrollmentError)?.kind == .pinMismatch }
    // And without a pin or an anchor there is no client at all.
    #expect(throws: EnrollmentError.self) { try ESTClient(server: server, trustAnchors: []) }
  }

  @Test("csrattrs lists what the RA asks for")
  func csrAttributes() throws {
    let f = try EnrollmentFixture()
    let oids = try f.client().csrAttributes()
    #expect(oids.contains("1.2.840.113549.1.9.7"))  // challengePassword
    #expect(oids.contains("1.2.840.10045.3.1.7"))  // P-256
  }

  // Not yet covered: enrollment against the RA capped at TLS 1.2 (`--tls-max 1.2`). With the
  // test CA's server certificate the RA ends the handshake with "no shared cipher", while the
  // same RA with an `openssl req`-made certificate, and openssl s_client/curl against either,
  // negotiate TLS 1.2. Under investigation; see the session note.
  @Test("a server we do not trust, or one that does not carry our name, is a typed TLS error")
  func untrustedServer() throws {
    let f = try EnrollmentFixture()
    let stranger = try TestCA(name: "Somebody Else's CA")
    let client = try ESTClient(
      server: try ESTServer(url: f.ra.localhostURL),
      trustAnchors: try Certificate.chain(pem: stranger.certificatePEM))
    #expect {
      try client.caCertificates()
    } throws: { error in
      guard let e = error as? EnrollmentError, e.kind == .tls else { return false }
      return e.tls?.layer == .serverCertificate && e.tls?.code == .untrustedRoot
        && e.tls?.certificate?.subject == "CN=EdgeKey Test Root CA"
    }
    // The name is checked too: the RA's certificate does not name 127.0.0.2.
    let wrongName = try ESTClient(server: try ESTServer(url: "https://127.0.0.2:\(f.ra.port)"), trustAnchors: f.anchors)
    #expect {
      try wrongName.caCertificates()
    } throws: { ($0 as? EnrollmentError)?.tls?.code == .nameMismatch || ($0 as? EnrollmentError)?.kind == .network }
  }
}

@Suite("registration authority refusals, seen by curl")
struct RegistrationAuthorityTests {
  @Test("malformed, unsigned, oversized, mistyped or wrong-key requests get the RFC's codes and change nothing")
  func refusals() throws {
    let f = try EnrollmentFixture(extraArguments: ["--max-body", "8192"])
    let caFile = f.ra.directory.appendingPathComponent("ca.pem").path
    func post(_ body: [UInt8], type: String = "application/pkcs10", path: String = "simpleenroll") throws -> String {
      let file = f.ra.directory.appendingPathComponent("body-\(UUID().uuidString)")
      try Data(body).write(to: file)
      return try Command.run(
        "curl",
        [
          "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", caFile, "-u", "device:factory-secret", "-H",
          "Content-Type: \(type)", "--data-binary", "@\(file.path)", "\(f.ra.localhostURL)/.well-known/est/\(path)",
        ])
    }
    let key = try f.newKey()
    let good = try f.request(key).der
    var tampered = good
    tampered[tampered.count - 3] ^= 0x55
    #expect(try post(Array(Base64.encodeLines(good).utf8), type: "text/plain") == "415")
    #expect(try post(Array("not base64 at all!".utf8)) == "400")
    #expect(try post(Array(Base64.encode(Array(repeating: 0x30, count: 64)).utf8)) == "400")
    #expect(try post(Array(Base64.encodeLines(tampered).utf8)) == "400")
    #expect(try post(Array(repeating: 65, count: 20_000)) == "413")
    #expect(try post(Array(Base64.encodeLines(good).utf8), path: "nosuchthing") == "404")
    #expect(f.ra.issuanceLog.isEmpty)

    // An RSA-1024 key (made by openssl) is below what the RA accepts.
    let weak = f.ra.directory.appendingPathComponent("weak.der")
    _ = try Command.run(
      "openssl",
      [
        "req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout", "/dev/null", "-subj", "/CN=weak", "-outform", "DER",
        "-out", weak.path,
      ])
    #expect(try post(Array(Base64.encodeLines(Array(try Data(contentsOf: weak))).utf8)) == "400")
    #expect(f.ra.issuanceLog.isEmpty)
    // And the good request still goes through afterwards.
    #expect(try post(Array(Base64.encodeLines(good).utf8)) == "200")
    #expect(f.ra.issuanceLog.count == 1)
  }
}

/// What RFC 7030 lets a server do and the client must then get right: a 401 challenge on
/// re-enrollment, a Retry-After longer than we like, a stop in the middle of a wait.
@Suite("EST edge cases another server may legally take")
struct ESTEdgeCaseTests {
  /// Records the waits `enroll` asks for instead of sleeping.
  final class Waits: @unchecked Sendable {
    private let lock = NSLock()
    private var all: [TimeInterval] = []
    func add(_ t: TimeInterval) {
      lock.lock()
      all.append(t)
      lock.unlock()
    }
    var values: [TimeInterval] {
      lock.lock()
      defer { lock.unlock() }
      return all
    }
  }

  @Test("re-enrollment against a server that also wants HTTP authentication: the 401 challenge is answered once")
  func reenrollAnswersChallenge() throws {
    let f = try EnrollmentFixture(extraArguments: ["--reenroll-password", "device:renew-secret"])
    let key = try f.newKey()
    let first = try f.client().enroll(try f.request(key), authentication: EnrollmentFixture.password)
    let next = try f.newKey()
    // The certificate alone: refused, with the server's reason and its challenge kept.
    let refused = #expect(throws: EnrollmentError.self) {
      try f.client().reenroll(try f.request(next), authentication: .certificate(first, key: key))
    }
    #expect(refused?.kind == .server(401))
    #expect(refused?.message.contains("re-enrollment needs HTTP authentication besides the certificate") == true)
    #expect(refused?.message.contains("Basic realm=\"EST re-enrollment\"") == true)
    // With credentials to answer the challenge: sent only when asked, and it works.
    var authentication = ESTAuthentication.certificate(first, key: key)
    authentication.challengeCredentials = (user: "device", password: "renew-secret")
    let renewed = try f.client().reenroll(try f.request(next), authentication: authentication)
    #expect(renewed[0].publicKeyDER == next.publicKey.spki)
    // A wrong answer is refused once, not retried in a loop.
    authentication.challengeCredentials = (user: "device", password: "guess")
    let wrong = #expect(throws: EnrollmentError.self) {
      try f.client().reenroll(try f.request(try f.newKey()), authentication: authentication)
    }
    #expect(wrong?.message.contains("our credentials were not accepted") == true)
    #expect(f.ra.issuanceLog.count == 2)
  }

  @Test("the renewal agent answers a re-enrollment challenge with its enrollment password")
  func agentAnswersChallenge() throws {
    let f = try EnrollmentFixture(extraArguments: ["--reenroll-password", "device:factory-secret"])
    let store = try CredentialStore(directory: stateDirectory())
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("device", "factory-secret")),
      identity: ([("CN", "device-401")], []))
    try agent.renew()  // first enrollment: password
    try agent.renew()  // re-enrollment: certificate, and the password when challenged
    #expect(agent.counters.renewals == 2)
    #expect(f.ra.issuanceLog.last?.contains("simplereenroll") == true)
  }

  @Test("Retry-After 3600: never asked sooner; beyond the bound the attempt ends with the server's time")
  func longRetryAfter() throws {
    let f = try EnrollmentFixture(extraArguments: ["--pending", "5", "--retry-after", "3600"])
    let waits = Waits()
    var options = ESTOptions()
    options.sleep = { waits.add($0.seconds) }
    let error = #expect(throws: EnrollmentError.self) {
      try f.client(options: options).enroll(try f.request(try f.newKey()), authentication: EnrollmentFixture.password)
    }
    #expect(error?.kind == .pendingTooLong)
    #expect(error?.retryAfter == .seconds(3600))
    #expect(error?.message.contains("come back in 3600 s") == true)
    #expect(waits.values.isEmpty, "a 300 s wait instead of the 3600 s asked: \(waits.values)")
    // Allowed to wait that long, it waits exactly what the server asked, each time.
    options.maximumRetryAfter = .seconds(7200)
    options.maximumPendingWait = .seconds(100_000)
    _ = try f.client(options: options).enroll(try f.request(try f.newKey()), authentication: EnrollmentFixture.password)
    #expect(waits.values == [3600, 3600, 3600, 3600, 3600])
  }

  @Test("the agent schedules its next try no sooner than the server's Retry-After")
  func agentHonoursRetryAfter() throws {
    let f = try EnrollmentFixture(extraArguments: ["--pending", "100", "--retry-after", "3600"])
    let events = EventLog()
    let store = try CredentialStore(directory: stateDirectory())
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("device", "factory-secret")),
      identity: ([("CN", "device-3600")], []), onEvent: events.add)
    agent.start()
    defer { agent.stop() }
    let deadline = Date().addingTimeInterval(30)
    while !events.all.contains(where: { $0.hasPrefix("renewal failed") }) && Date() < deadline { usleep(20_000) }
    let failed = try #require(events.all.first { $0.hasPrefix("renewal failed") })
    #expect(failed.contains("retry in 3600") || failed.contains("retry in 36"), "\(failed)")
  }

  /// An agent for an RA that answers 202 with Retry-After 120 a hundred times, allowed to wait
  /// that long; `log` shows each wait.
  private func agentWaitingOutRetryAfter(commonName: String) throws -> (
    EnrollmentFixture, CredentialStore, RecordingLogHandler, RenewalAgent
  ) {
    let f = try EnrollmentFixture(extraArguments: ["--pending", "100", "--retry-after", "120"])
    let store = try CredentialStore(directory: stateDirectory())
    var settings = try f.settings(password: ("device", "factory-secret"))
    settings.options.maximumRetryAfter = .seconds(600)
    settings.options.maximumPendingWait = .seconds(6000)
    let log = RecordingLogHandler()
    settings.options.logger = Logger(label: "test", level: .info, handler: log)
    let agent = RenewalAgent(store: store, tpm: f.tpm, settings: settings, identity: ([("CN", commonName)], []))
    return (f, store, log, agent)
  }

  @Test("stop() during a long 202 wait and during a transfer returns within a second, .cancelled, nothing stored")
  func stopCutsWaitsShort() throws {
    let (f, store, log, agent) = try agentWaitingOutRetryAfter(commonName: "device-stop")
    agent.start()
    // Wait for the event: the RA answered 202 and the client is in its 120 s wait.
    let deadline = Date().addingTimeInterval(30)
    while !log.messages.contains(where: { $0.contains("waiting 120 s") }) && Date() < deadline { usleep(20_000) }
    #expect(log.messages.contains { $0.contains("waiting 120 s as the server asks") })
    try returnsWithin(.seconds(20)) { agent.stop() }
    #expect(agent.lastError?.kind == .cancelled, "\(String(describing: agent.lastError))")
    #expect(try store.read(.current) == nil)
    #expect(f.ra.issuanceLog.isEmpty)

    // A transfer cut short: a server that accepts the connection and never answers.
    let silent = try SilentServer()
    var options = ESTOptions()
    options.timeout = .seconds(600)
    let cancellation = ESTCancellation()
    options.cancellation = cancellation
    let client = try ESTClient(
      server: try ESTServer(url: "https://127.0.0.1:\(silent.port)"), trustAnchors: try f.anchors, options: options)
    Thread.detachNewThread {
      Threads.sleep(0.3)
      cancellation.cancel()
    }
    let error = #expect(throws: EnrollmentError.self) {
      try returnsWithin(.seconds(20)) { try client.caCertificates() }
    }
    #expect(error?.kind == .cancelled)
  }

  @Test("cancelling the task of an async renew() ends its 202 wait: .cancelled, nothing stored, the agent still usable")
  func taskCancellationEndsRenew() async throws {
    let (f, store, log, agent) = try agentWaitingOutRetryAfter(commonName: "device-task")
    let renewal = Task { try await agent.renew() }
    // Wait for the event: the RA answered 202 and the client is in its 120 s wait.
    while !log.messages.contains(where: { $0.contains("waiting 120 s") }) {
      try await ContinuousClock().sleep(for: .milliseconds(20))
    }
    let clock = ContinuousClock()
    let cancelled = clock.now
    renewal.cancel()
    let result = await renewal.result
    let took = clock.now - cancelled
    print("renew() ended \(took) after its task was cancelled, in a 120 s Retry-After wait")
    guard case .failure(let error) = result else {
      Issue.record("renew() succeeded through a 120 s wait it should have left")
      return
    }
    #expect((error as? EnrollmentError)?.kind == .cancelled, "\(error)")
    #expect(try store.read(.current) == nil)
    #expect(f.ra.issuanceLog.isEmpty)
    // The cancellation was the call's own: the agent's next renewal is not cancelled by it.
    let next = Task { try await agent.renew() }
    while log.messages.filter({ $0.contains("waiting 120 s") }).count < 2 {
      try await ContinuousClock().sleep(for: .milliseconds(20))
    }
    next.cancel()
    let nextResult = await next.result
    #expect(throws: EnrollmentError.self) { try nextResult.get() }
  }
}

@Suite("csrattrs: what the server asks for is applied, and what is not understood is reported")
struct CSRAttributesTests {
  /// RFC 7030 §4.5.2's example: challengePassword, an EC key on secp384r1, an extensionRequest
  /// for macAddress (1.3.6.1.1.1.1.22), ecdsa-with-SHA384.
  static let rfcExample = "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="

  @Test("RFC 7030's example reads field by field; malformed answers are typed errors")
  func parsesTheRFCExample() throws {
    let der = try #require(Data(base64Encoded: Self.rfcExample).map { [UInt8]($0) })
    let attributes = try CSRAttributes(der: der)
    #expect(attributes.keyAlgorithm == .eccP384)
    #expect(attributes.signatureHash == .sha384)
    #expect(attributes.challengePassword)
    #expect(attributes.notUnderstood == ["extension 1.3.6.1.1.1.1.22"])
    for n in 0..<der.count {
      _ = try? CSRAttributes(der: Array(der.prefix(n)))  // never a crash
    }
    #expect(throws: EnrollmentError.self) { try CSRAttributes(der: [0x04, 0x00]) }
    #expect(throws: EnrollmentError.self) { try CSRAttributes(der: [0x30, 0x02, 0x02, 0x00]) }
  }

  @Test("a server that asks for P-384 and SHA-384 gets them; an OID we do not know is reported, not ignored")
  func agentAppliesWhatItUnderstands() throws {
    // The RFC's example plus an attribute nobody knows (1.2.3.4).
    var der = try #require(Data(base64Encoded: Self.rfcExample).map { [UInt8]($0) })
    der = [0x30, UInt8(der.count - 2 + 5)] + der[2...] + [0x06, 0x03, 0x2A, 0x03, 0x04]
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-csrattrs-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    let file = dir.appendingPathComponent("csrattrs.der")
    try Data(der).write(to: file)
    let f = try EnrollmentFixture(extraArguments: ["--csrattrs", file.path])
    let events = EventLog()
    let store = try CredentialStore(directory: stateDirectory())
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("device", "factory-secret")),
      identity: ([("CN", "device-attrs")], []), onEvent: events.add)
    let issued = try agent.renew()
    #expect(try issued.credential.key.publicKey().algorithm == .eccP384)
    #expect(issued.certificate?.keyType == "EC P-384")
    let said = try #require(events.all.first { $0.hasPrefix("the server's csrattrs") })
    #expect(said.contains("key ecc-p384"))
    #expect(said.contains("signed with sha384"))
    #expect(said.contains("1.2.3.4 (not understood)"))
    #expect(said.contains("extension 1.3.6.1.1.1.1.22"))
    #expect(said.contains("challengePassword (only a channel binding"))
  }
}
