import COpenSSL
import EdgeKey
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

extension EnrollmentFixture {
  /// A manufacturer credential: a TPM key and a certificate for it from `factory`.
  func bootstrapCredential(from factory: TestCA, commonName: String) throws -> Credential {
    let file = try tpm.createKey(.eccP256)
    let issued = try factory.issueClient(publicKeyDER: try file.publicKey().spki, commonName: commonName)
    return Credential(key: file, chain: try Certificate.chain(pem: issued.certificate))
  }

  func settings(password: (String, String)? = nil) throws -> EnrollmentSettings {
    EnrollmentSettings(
      server: try ESTServer(url: ra.localhostURL), trustAnchors: try anchors,
      password: password.map { (user: $0.0, password: $0.1) })
  }
}

/// Records events, thread-safely.
final class EventLog: @unchecked Sendable {
  private let lock = NSLock()
  private var events: [String] = []
  func add(_ e: RenewalEvent) {
    lock.lock()
    events.append(e.description)
    lock.unlock()
  }
  var all: [String] {
    lock.lock()
    defer { lock.unlock() }
    return events
  }
}

func stateDirectory() -> String { temporaryPath("state") }

@Suite("credential store and renewal agent")
struct RenewalTests {
  @Test("the store: 0700 and 0600, key and chain in one file, a cut-short switch finished on open")
  func store() throws {
    let f = try EnrollmentFixture()
    let dir = stateDirectory()
    let store = try CredentialStore(directory: dir)
    var info = stat()
    stat(dir, &info)
    #expect(info.st_mode & 0o777 == 0o700)
    #expect(try store.read(.current) == nil)

    let old = try f.bootstrapCredential(from: f.ca, commonName: "device-1")
    let new = try f.bootstrapCredential(from: f.ca, commonName: "device-1")
    try store.write(old, to: .current)
    stat(store.path(.current), &info)
    #expect(info.st_mode & 0o777 == 0o600)
    // Killed after saving the issued credential and before switching: open() switches.
    try store.write(new, to: .next)
    FileManager.default.createFile(atPath: store.path(.current) + ".tmp-1-2", contents: Data("torn".utf8))
    let reopened = try CredentialStore(directory: dir)
    #expect(reopened.recovery.finishedSwitch)
    #expect(reopened.recovery.removedTemporaryFiles == 1)
    #expect(try reopened.read(.current)?.certificate?.der == new.certificate?.der)
    #expect(try reopened.read(.previous)?.certificate?.der == old.certificate?.der)
    #expect(try reopened.read(.next) == nil)
    // The file is what tpm2-openssl and openssl read: key block, then the chain.
    let text = try String(contentsOfFile: reopened.path(.current), encoding: .utf8)
    #expect(text.hasPrefix("-----BEGIN TSS2 PRIVATE KEY-----"))
    #expect(text.contains("-----BEGIN CERTIFICATE-----"))

    // An OpenSSL error some other code left in this thread's queue does not make a stored
    // credential look damaged.
    let garbage: [UInt8] = [0x30, 0x05, 0x01]
    garbage.withUnsafeBufferPointer { buffer in
      var p: UnsafePointer<UInt8>? = buffer.baseAddress
      #expect(d2i_X509(nil, &p, buffer.count) == nil)
    }
    #expect(ERR_peek_last_error() != 0)
    #expect(try reopened.read(.current)?.certificate?.der == new.certificate?.der)

    // A certificate stored with another key, and a damaged file: errors, nothing discarded.
    try String(old.key.pem + new.chain.map(\.pem).joined()).write(
      toFile: reopened.path(.bootstrap), atomically: true, encoding: .utf8)
    #expect(throws: EnrollmentError.self) { try reopened.read(.bootstrap) }
    try "-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n".write(
      toFile: reopened.path(.bootstrap), atomically: true, encoding: .utf8)
    let damaged = #expect(throws: EnrollmentError.self) { try reopened.read(.bootstrap) }
    #expect(damaged?.kind == .storage)
    #expect(FileManager.default.fileExists(atPath: reopened.path(.bootstrap)))

    // Retiring the previous credential deletes it and hands back its key.
    #expect(try reopened.retirePrevious() == old.key)
    #expect(try reopened.read(.previous) == nil)
  }

  @Test(
    "renewal moments: 60 to 75 % of the lifetime, spread over the window; retries above a floor, full jitter, bounded after expiry"
  )
  func policy() throws {
    let ca = try TestCA()
    var policy = RenewalPolicy()
    var points: [Double] = []
    for _ in 0..<40 {
      let issued = try ca.issueSoftwareClient(commonName: "d")
      EVP_PKEY_free(issued.key)
      let cert = try Certificate(pem: issued.certificate)
      let lifetime = cert.notAfter.timeIntervalSince(cert.notBefore)
      let at = policy.renewalDate(for: cert).timeIntervalSince(cert.notBefore) / lifetime
      #expect(at <= 0.75 + 1e-9 && at >= 0.60 - 1e-9, "\(at)")
      #expect(policy.renewalDate(for: cert) == policy.renewalDate(for: cert), "the same moment after a restart")
      points.append(at)
    }
    // A batch issued within a second spreads over the window instead of renewing as one: of 40,
    // some land in each third of it (the chance that one third stays empty is below 1e-6).
    for third in 0..<3 {
      let low = 0.60 + Double(third) * 0.05
      #expect(
        points.contains { $0 >= low && $0 < low + 0.05 + 1e-9 }, "no renewal in [\(low), \(low + 0.05)): \(points)")
    }

    // Before expiry: doubling bounds, capped at a third of what is left, never below the floor.
    let day = Duration.seconds(86400)
    #expect(policy.backoff(failures: 1, remaining: day, random: 0) == .seconds(30))
    #expect(policy.backoff(failures: 1, remaining: day, random: 1) == .seconds(30))
    #expect(policy.backoff(failures: 4, remaining: day, random: 1) == .seconds(240))
    #expect(policy.backoff(failures: 4, remaining: day, random: 0.5) == .seconds(135))
    #expect(policy.backoff(failures: 30, remaining: day, random: 1) == .seconds(3600))
    // Two minutes left: at most a third of it; a few seconds left: the floor, not one a second.
    #expect(policy.backoff(failures: 30, remaining: .seconds(120), random: 1) == .seconds(40))
    #expect(policy.backoff(failures: 30, remaining: .seconds(3), random: 1) == .seconds(30))
    // Expired, able to enroll again: never more than 45 s apart, so the fleet is back soon
    // after its RA; unable to: the long waits (only an operator can help).
    #expect(policy.backoff(failures: 30, remaining: .zero, canEnroll: true, random: 1) == .seconds(45))
    #expect(policy.backoff(failures: 30, remaining: .seconds(-600), canEnroll: true, random: 0) == .seconds(30))
    #expect(policy.backoff(failures: 30, remaining: .zero, canEnroll: false, random: 1) == .seconds(3600))
    // On average during an outage: at least the 30 s the RA can take from each device.
    var total = Duration.zero
    for i in 0..<1000 {
      total += policy.backoff(
        failures: 1 + i % 8, remaining: .seconds(Double(60 - i % 90)), random: Double(i % 100) / 100)
    }
    #expect(total / 1000 >= .seconds(30))
  }

  @Test(
    "a TPM cleared or replaced under the state directory: refused on the used secret; once re-armed, a new key is enrolled and the old revoked"
  )
  func clearedTPMReenrollsWithPassword() throws {
    let f = try EnrollmentFixture(password: nil)
    let secret = "one-time-secret-of-device-lost"
    try f.ra.importManifest([RegistrationAuthority.manifestLine(serial: "SN-LOST", name: "device-lost", secret: secret)]
    )
    let store = try CredentialStore(directory: stateDirectory())
    let events = EventLog()
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("SN-LOST", secret)),
      identity: ([("CN", "device-lost")], []), onEvent: events.add)
    let first = try agent.renew()
    #expect(try agent.hasWorkingCredential())
    // renew() hands back the key loaded in the TPM with the credential: the certificate's key.
    #expect(first.key.publicKey.spki == first.certificate?.publicKeyDER)
    try f.swtpm.replaceWithFresh()
    // The certificate is still valid, but its key will never load in this TPM.
    #expect(try !agent.hasWorkingCredential())
    #expect(events.all.contains { $0.contains("can no longer be loaded by this TPM") })
    // The one-time secret was used, and a new key is not the device's old one: refused.
    let refused = #expect(throws: EnrollmentError.self) { try agent.renew() }
    #expect(refused?.kind == .server(403))
    #expect(refused?.message.contains("was used on") == true)
    // The operator re-arms the device's enrollment; the old key's certificate is revoked.
    try f.ra.rearm("SN-LOST", secret: secret)
    let second = try agent.renew()
    let (_, shown) = try f.ra.admin(["show", "SN-LOST"])
    #expect(shown.contains("certificate \(first.certificate!.serialNumber)"))
    #expect(shown.contains("(superseded)"), "\(shown)")
    #expect(second.certificate?.der != first.certificate?.der)
    #expect(try second.credential.key.publicKey() != first.credential.key.publicKey(), "a new key, made in the new TPM")
    #expect(try agent.hasWorkingCredential())
    #expect(agent.counters.credentialsLost >= 1)
    #expect(events.all.contains { $0.contains("falling back to the bootstrap credential") })
    let (_, key) = try #require(try agent.current())
    _ = try key.sign(digest: [UInt8](repeating: 1, count: 32), hash: .sha256)
  }

  @Test("a TPM cleared or replaced with no password and no bootstrap credential: a clear refusal, nothing issued")
  func clearedTPMWithoutPasswordIsRefused() throws {
    let f = try EnrollmentFixture()
    let store = try CredentialStore(directory: stateDirectory())
    let enrolling = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("device", "factory-secret")),
      identity: ([("CN", "device-lost-2")], []))
    try enrolling.renew()
    try f.swtpm.replaceWithFresh()
    let issued = f.ra.issuanceLog.count
    let agent = RenewalAgent(store: store, tpm: f.tpm, settings: try f.settings())
    let error = #expect(throws: EnrollmentError.self) { try agent.renew() }
    #expect(error?.kind == .credentialLost)
    #expect(error?.message.contains("provision the device again") == true)
    #expect(error?.isTransient == false)
    #expect(f.ra.issuanceLog.count == issued)
    #expect(try store.read(.current) != nil, "the lost credential is kept, not deleted")
  }

  @Test("a clock before the build or before our certificate renews, rotates and discards nothing")
  func wrongClock() throws {
    let factory = try TestCA(name: "Factory CA")
    let f = try EnrollmentFixture(password: nil, bootstrapCA: factory)
    let store = try CredentialStore(directory: stateDirectory())
    try store.write(try f.bootstrapCredential(from: factory, commonName: "device-9"), to: .bootstrap)
    let events = EventLog()
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(), clock: { Date(timeIntervalSince1970: 946_684_800) },
      onEvent: events.add)
    let error = #expect(throws: EnrollmentError.self) { try agent.renew() }
    #expect(error?.kind == .clock)
    #expect(error?.message.contains("before this software was built") == true)
    #expect(agent.counters.clockRefusals == 1)
    #expect(try store.read(.next) == nil, "no key was created")
    #expect(f.ra.issuanceLog.isEmpty)

    // A clock a year behind the certificate (newer build, stale RTC) is refused too.
    let enrolled = RenewalAgent(store: store, tpm: f.tpm, settings: try f.settings())
    let credential = try enrolled.renew()
    let behind = credential.certificate!.notBefore.addingTimeInterval(-86400)
    var policy = RenewalPolicy()
    policy.earliestPlausibleDate = behind.addingTimeInterval(-86400)
    let stale = RenewalAgent(store: store, tpm: f.tpm, settings: try f.settings(), policy: policy, clock: { behind })
    let refused = #expect(throws: EnrollmentError.self) { try stale.renew() }
    #expect(refused?.message.contains("before our certificate was issued") == true)
    #expect(try store.read(.current)?.certificate?.der == credential.certificate?.der)
    #expect(f.ra.issuanceLog.count == 1)
  }

  @Test(
    "end to end: factory enrollment with a bootstrap certificate, MQTT, three renewals with new keys while messages flow, none lost"
  )
  func endToEnd() async throws {
    let factory = try TestCA(name: "Factory CA")
    let f = try EnrollmentFixture(
      password: nil, bootstrapCA: factory, lifetime: "6s", backdate: "1",
      extraArguments: ["--allow-san", "DNS:{name}.fleet.example"])
    let store = try CredentialStore(directory: stateDirectory())
    try store.write(try f.bootstrapCredential(from: factory, commonName: "device-42"), to: .bootstrap)
    var policy = RenewalPolicy()
    policy.initialBackoff = .milliseconds(500)
    let events = EventLog()
    let serverCert = try f.ca.issueServer()
    let tlsPolicy = TLSPolicy(trustAnchorsPEM: f.ca.certificatePEM, serverName: "127.0.0.1")
    let installed = Installed(policy: tlsPolicy)
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(), policy: policy,
      identity: (subject: [("O", "EdgeKey Tests"), ("CN", "device-42")], names: [.dns("device-42.fleet.example")]),
      onEvent: events.add, install: { credential, key in installed.install(credential, key) })

    // The broker and a subscriber first: under load they take seconds, and the certificates
    // live six.
    let broker = try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: f.ca.certificatePEM)
    let sinkIdentity = try f.ca.issueSoftwareClient(commonName: "sink-42")
    defer { EVP_PKEY_free(sinkIdentity.key) }
    let sink = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: broker.port),
      tls: try TLSClientContext(
        certificateChain: try Certificate.chain(pem: sinkIdentity.certificate), softwareKey: sinkIdentity.key,
        policy: tlsPolicy))
    try await sink.connect()
    try await sink.subscribe("devices/device-42/#", qos: .atLeastOnce)

    // Factory enrollment: the bootstrap certificate authenticates, the RA issues the first one.
    let first = try await agent.renew()
    #expect(first.certificate?.commonName == "device-42")
    #expect(first.certificate?.issuer == (try f.anchors)[0].subject)
    let (credential, key) = try await #require(try agent.current())
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    let device = try MQTTClient(
      configuration,
      tls: try TLSClientContext(certificateChain: credential.chain, key: key, policy: tlsPolicy),
      outbox: try Outbox(path: temporaryPath("outbox.db")))
    installed.switcher.attach(device, agent: agent)
    // Started before the first connection: if that is slow, the agent has renewed meanwhile.
    device.start()

    agent.start()
    var accepted = Set<String>()
    let deadline = Date().addingTimeInterval(40)
    var i = 0
    while agent.counters.renewals < 4 && Date() < deadline {
      let text = "reading \(i)"
      try await device.enqueue([
        MQTTMessage(topic: "devices/device-42/telemetry", payload: Array(text.utf8), qos: .atLeastOnce)
      ])
      accepted.insert(text)
      i += 1
      try await Task.sleep(nanoseconds: 20_000_000)
    }
    await agent.stop()
    try await device.waitUntilDelivered(timeout: .seconds(30))
    let (got, duplicates) = await drain(sink, expecting: accepted, within: 30)
    let missing = accepted.subtracting(got)
    print(
      "renewal end to end: \(agent.counters.renewals) certificates, \(accepted.count) messages accepted, "
        + "\(got.count) arrived, \(duplicates) duplicates, \(device.metrics.connections) connections")
    for e in events.all { print("  event: \(e)") }
    #expect(agent.counters.renewals >= 4, "factory enrollment + three renewals")
    #expect(missing.isEmpty, "\(missing.count) accepted messages never arrived")
    // A new TPM key each time; every certificate used in a handshake, and the old keys retired.
    let keys = installed.publicKeys
    #expect(keys.count >= 4)
    #expect(Set(keys).count == keys.count, "each renewal used a new key")
    #expect(device.metrics.connections >= 4)
    #expect(agent.counters.keysRetired >= 3)
    #expect(agent.counters.bootstrapFallbacks == 0)
    #expect(try store.read(.previous) == nil)
    #expect(try store.read(.bootstrap) != nil, "the factory credential stays")
    #expect(f.ra.issuanceLog.count == agent.counters.renewals)
    await device.stop()
    await sink.stop()
  }

  @Test("a CA rollover: the new root is added when a link certificate vouches for it, the old one dropped once unused")
  func caRollover() throws {
    let f = try EnrollmentFixture(password: "device:factory-secret")
    let store = try CredentialStore(directory: stateDirectory())
    let events = EventLog()
    let identity = (subject: [("CN", "device-31")], names: [SubjectAlternativeName]())
    let first = try RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("device", "factory-secret")), identity: identity
    ).renew()
    #expect(try store.anchors().map(\.der) == [try f.anchors[0].der])

    // The CA rolls over: the RA now issues from a new root and publishes new, NewWithOld and
    // old, plus a stranger's root that nothing vouches for. Its TLS certificate stays old.
    let newRoot = try TestCA(name: "EdgeKey New Root CA")
    let rogue = try TestCA(name: "Rogue Root CA")
    let published =
      newRoot.certificatePEM + (try f.ca.crossCertify(newRoot)) + f.ca.certificatePEM + rogue.certificatePEM
    // The rolled-over RA keeps the fleet's registry.
    let rolled = try RegistrationAuthority(
      ca: newRoot, password: nil, cacertsPEM: published, tlsCA: f.ca, registryPath: f.ra.registryPath)
    var settings = try f.settings()
    settings.server = try ESTServer(url: rolled.localhostURL)
    let agent = RenewalAgent(store: store, tpm: f.tpm, settings: settings, identity: identity, onEvent: events.add)
    let second = try agent.renew()
    #expect(second.certificate?.issuer == "CN=EdgeKey New Root CA")
    #expect(first.certificate?.issuer == "CN=EdgeKey Test Root CA")
    let anchors = try store.anchors().map(\.subject)
    #expect(anchors == ["CN=EdgeKey Test Root CA", "CN=EdgeKey New Root CA"], "added, and the rogue root not")
    try agent.confirmInUse()
    #expect(try store.anchors().count == 2, "the old root is still sent: kept")

    // The old root is no longer published: dropped once the new chain has been used.
    let final = try RegistrationAuthority(
      ca: newRoot, password: nil, cacertsPEM: newRoot.certificatePEM, tlsCA: f.ca, registryPath: f.ra.registryPath)
    settings.server = try ESTServer(url: final.localhostURL)
    let last = RenewalAgent(store: store, tpm: f.tpm, settings: settings, identity: identity, onEvent: events.add)
    try last.renew()
    #expect(try store.anchors().count == 2, "not dropped before the new chain has been used")
    try last.confirmInUse()
    #expect(try store.anchors().map(\.subject) == ["CN=EdgeKey New Root CA"])
    #expect(last.counters.anchorsRemoved == 1)
    #expect(events.all.contains { $0.contains("trust anchors removed") })
  }

  @Test("the RA signs with an issuing CA key held in the station's own TPM")
  func stationTPM() throws {
    let f = try EnrollmentFixture()
    let station = try SoftwareTPM()
    let keyFile = try TPM.open(tcti: station.tcti).createKey(.eccP256)
    let keyPath = f.ra.directory.appendingPathComponent("station-ca.tss").path
    try keyFile.write(to: keyPath)
    let issuing = try f.ca.issueCA(publicKeyDER: try keyFile.publicKey().spki, name: "Station Issuing CA")
    let ra = try RegistrationAuthority(
      ca: f.ca, tpmIssuer: (chainPEM: issuing + f.ca.certificatePEM, keyFile: keyPath, tcti: station.tcti))
    var settings = try f.settings(password: ("device", "factory-secret"))
    settings.server = try ESTServer(url: ra.localhostURL)
    let store = try CredentialStore(directory: stateDirectory())
    let issued = try RenewalAgent(
      store: store, tpm: f.tpm, settings: settings, identity: (subject: [("CN", "device-88")], names: [])
    ).renew()
    #expect(issued.certificate?.issuer == "CN=Station Issuing CA")
    #expect(issued.chain.map(\.subject) == ["CN=device-88", "CN=Station Issuing CA"], "checked up to the root")
    #expect(try store.anchors().map(\.subject) == ["CN=EdgeKey Test Root CA"])
  }

  @Test("channel binding: requests carry their connection's tls-unique, which the RA checks; TLS 1.3 says why not")
  func channelBinding() throws {
    let f = try EnrollmentFixture(extraArguments: ["--channel-binding", "--tls-max", "1.2"])
    var settings = try f.settings(password: ("device", "factory-secret"))
    settings.options.maximumVersion = .tls12
    let identity = (subject: [("CN", "device-64")], names: [SubjectAlternativeName]())
    let store = try CredentialStore(directory: stateDirectory())
    let unbound = #expect(throws: EnrollmentError.self) {
      try RenewalAgent(store: store, tpm: f.tpm, settings: settings, identity: identity).renew()
    }
    #expect(unbound?.kind == .server(400))
    #expect(unbound?.message.contains("tls-unique") == true)

    settings.channelBinding = true
    let agent = RenewalAgent(store: store, tpm: f.tpm, settings: settings, identity: identity)
    let first = try agent.renew()  // enrollment, bound
    let second = try agent.renew()  // re-enrollment with the TLS client certificate, bound
    #expect(first.certificate?.commonName == "device-64")
    #expect(second.certificate?.der != first.certificate?.der)
    #expect(f.ra.issuanceLog.count == 2)

    // A server that negotiates TLS 1.3 cannot be bound to: the error says so, nothing is sent.
    let modern = try RegistrationAuthority(ca: f.ca)
    var settings13 = settings
    settings13.server = try ESTServer(url: modern.localhostURL)
    settings13.options.maximumVersion = .tls13
    let refused = #expect(throws: EnrollmentError.self) {
      try RenewalAgent(store: store, tpm: f.tpm, settings: settings13, identity: identity).renew()
    }
    #expect(refused?.kind == .configuration)
    #expect(refused?.message.contains("TLS 1.2") == true)
    #expect(modern.issuanceLog.isEmpty)
  }

  @Test("an expired certificate falls back to the bootstrap credential; without one the error says so")
  func expiredFallsBack() throws {
    let factory = try TestCA(name: "Factory CA")
    let f = try EnrollmentFixture(password: nil, bootstrapCA: factory, lifetime: "2s", backdate: "0")
    let store = try CredentialStore(directory: stateDirectory())
    let events = EventLog()
    // First enrollment with the bootstrap credential, which is then put away; the certificate
    // is left to expire.
    let bootstrap = try f.bootstrapCredential(from: factory, commonName: "device-77")
    try store.write(bootstrap, to: .bootstrap)
    let first = try RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(), identity: (subject: [("CN", "device-77")], names: [])
    ).renew()
    try store.remove(.bootstrap)
    Thread.sleep(forTimeInterval: 3)
    #expect(first.certificate!.isValid(at: Date()) == false)
    let withoutBootstrap = RenewalAgent(store: store, tpm: f.tpm, settings: try f.settings(), onEvent: events.add)
    let error = #expect(throws: EnrollmentError.self) { try withoutBootstrap.renew() }
    #expect(error?.kind == .configuration)
    #expect(error?.message.contains("expired") == true)
    #expect(try store.read(.current)?.certificate?.der == first.certificate?.der, "nothing discarded")

    try store.write(bootstrap, to: .bootstrap)
    let agent = RenewalAgent(store: store, tpm: f.tpm, settings: try f.settings(), onEvent: events.add)
    let again = try agent.renew()
    #expect(again.certificate?.commonName == "device-77")
    #expect(agent.counters.bootstrapFallbacks == 1)
    #expect(events.all.contains { $0.contains("falling back to the bootstrap credential") })
  }
}

@Suite("renewal through an RA outage that outlasts the certificate (issue 21)")
struct RenewalOutageTests {
  @Test(
    "the RA down past the certificate's expiry: retries never faster than the floor, at most expiredBackoff apart once expired, valid again at the first retry after the RA is back"
  )
  func outageOutlastsCertificate() async throws {
    let factory = try TestCA(name: "Factory CA")
    let f = try EnrollmentFixture(password: nil, bootstrapCA: factory, lifetime: "6s", backdate: "0")
    let store = try CredentialStore(directory: stateDirectory())
    try store.write(try f.bootstrapCredential(from: factory, commonName: "device-78"), to: .bootstrap)
    // The schedule's constants shrunk 30-fold so the outage fits in a test; the defaults are
    // checked by `policy()` (30 s floor, 45 s after expiry).
    var policy = RenewalPolicy()
    policy.minimumBackoff = .seconds(1)
    policy.initialBackoff = .seconds(1)
    policy.expiredBackoff = .milliseconds(1500)
    policy.maximumBackoff = .seconds(120)
    let (events, sink) = AsyncStream.makeStream(of: RenewalEvent.self)
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(), policy: policy,
      identity: (subject: [("CN", "device-78")], names: []), onEvent: { sink.yield($0) })
    agent.start()
    var iterator = events.makeAsyncIterator()
    func nextRenewal() async -> Bool {
      while let event = await iterator.next() { if case .renewed = event { return true } }
      return false
    }
    #expect(await nextRenewal(), "the first enrollment")
    let certificate = try #require(try store.read(.current)?.certificate)
    f.ra.stop()
    // Every failed attempt during the outage, and whether the certificate had expired by then.
    var waits: [(wait: Duration, expired: Bool)] = []
    while waits.filter(\.expired).count < 4, let event = await iterator.next() {
      if case .failed(let error, let retryIn?) = event {
        waits.append((retryIn, certificate.notAfter <= Date()))
        #expect(error.isTransient, "an RA that is down is transient: \(error)")
      }
    }
    let clock = ContinuousClock()
    let back = clock.now
    try f.ra.restart()
    #expect(await nextRenewal(), "valid again after the RA came back")
    let recovered = clock.now - back
    await agent.stop()
    let valid = try #require(try store.read(.current)?.certificate)
    #expect(valid.isValid(at: Date()))
    print(
      "RA outage past expiry: \(waits.count) failed attempts, waits \(waits.map { "\($0.wait.secondsText)\($0.expired ? "e" : "")" }), "
        + "valid again \(recovered) after the RA's restart began")
    #expect(waits.allSatisfy { $0.wait >= policy.minimumBackoff }, "below the floor: \(waits)")
    #expect(waits.filter(\.expired).allSatisfy { $0.wait <= policy.expiredBackoff }, "after expiry: \(waits)")
    #expect(!waits.filter(\.expired).isEmpty)
  }
}

@Suite("a slow chip: every TPM command 540 ms (the slowest real chips'), the defaults still enroll and renew")
struct SlowChipTests {
  @Test(
    "enrollment, then a renewal with a new key over TLS client authentication, with no timeout raised (the delay is a mock: swtpm answers in 1 ms)"
  )
  func enrollAndRenewOnASlowChip() async throws {
    // Async: the 10 s of TPM waits run on EdgeKey's threads, not on one of the two threads
    // of the cooperative pool every other test needs.
    let f = try EnrollmentFixture(tctiPrefix: "delay:540:")
    let store = try CredentialStore(directory: stateDirectory())
    let agent = RenewalAgent(
      store: store, tpm: f.tpm, settings: try f.settings(password: ("device", "factory-secret")),
      identity: ([("CN", "device-slow")], []))
    let clock = ContinuousClock()
    var start = clock.now
    let before = f.tpm.commandCount
    let enrolled = try await agent.renew()
    let enrollment = (clock.now - start, f.tpm.commandCount - before)
    start = clock.now
    let middle = f.tpm.commandCount
    let renewed = try await agent.renew()
    let renewal = (clock.now - start, f.tpm.commandCount - middle)
    #expect(renewed.certificate?.serialNumber != enrolled.certificate?.serialNumber)
    #expect(renewed.key.publicKey.spki == renewed.certificate?.publicKeyDER, "a new key, and the certificate is for it")
    print(
      "slow chip (540 ms a command): enrollment \(enrollment.0) with \(enrollment.1) TPM commands, "
        + "renewal \(renewal.0) with \(renewal.1)")
  }
}

@Suite("renewal killed at many points (SIGKILL of the edgekey CLI)")
struct KillDuringRenewalTests {
  @Test("killed at any instant of an enrollment or renewal, the device comes back with a working, matching credential")
  func killAnywhere() async throws {
    // On a thread of its own: it blocks for long (see onOwnThread).
    try await onOwnThread {
      let factory = try TestCA(name: "Factory CA")
      let f = try EnrollmentFixture(password: nil, bootstrapCA: factory)
      let dir = stateDirectory()
      let work = (temporaryPath("x") as NSString).deletingLastPathComponent
      try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
      let caFile = work + "/ca.pem"
      try f.ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
      let bootstrap = try f.bootstrapCredential(from: factory, commonName: "device-50")
      try CredentialStore(directory: dir).write(bootstrap, to: .bootstrap)
      let edgekey = try builtExecutable("edgekey")
      let common = ["--state", dir, "--server", f.ra.localhostURL, "--cafile", caFile, "--tcti", f.swtpm.tcti]
      let log = work + "/cli.log"

      /// Runs the CLI and kills it after `delay` seconds (or lets it finish if it is quicker).
      func run(_ words: [String], killAfter delay: Double?) throws -> Bool {
        let p = try ChildProcess(edgekey, words + common, logPath: log)
        guard let delay else {
          while p.isRunning { usleep(5_000) }
          return true
        }
        let deadline = Date().addingTimeInterval(delay)
        while p.isRunning && Date() < deadline { usleep(500) }
        let finished = !p.isRunning
        p.kill9()
        return finished
      }

      /// What a restarted device finds: a credential whose certificate is for its key, valid now,
      /// and a key the TPM can load and sign with.
      func check(_ trial: String) throws -> String {
        let store = try CredentialStore(directory: dir)
        let current = try #require(try store.read(.current), "\(trial): no current credential")
        let cert = try #require(current.certificate, "\(trial): a key without its certificate")
        #expect(cert.isValid(at: Date()), "\(trial)")
        // What a restarted device's TPM.open does on a direct TCTI: flush the objects the killed
        // process left loaded (swtpm has no resource manager to do it).
        _ = try f.tpm.flushAllTransientObjects()
        let key = try f.tpm.loadKey(current.key)
        _ = try key.sign(digest: Array(repeating: 7, count: 32), hash: .sha256)
        return cert.fingerprint
      }

      // Factory enrollment, killed at growing delays until one run completes.
      var delay = 0.0
      var enrollKills = 0
      while try !run(["enroll", "--subject", "O=EdgeKey Tests,CN=device-50"], killAfter: delay) {
        enrollKills += 1
        let store = try CredentialStore(directory: dir)
        // Before the first certificate there is nothing to fall back on but bootstrap, which stays.
        if let current = try store.read(.current) { #expect(current.isComplete) }
        #expect(try store.read(.bootstrap)?.certificate?.der == bootstrap.certificate?.der)
        delay += 0.015
      }
      var seen = [try check("after enrollment")]

      // Renewals, each killed at a point spread over the run's whole duration.
      let started = Date()
      _ = try run(["renew", "--force"], killAfter: nil)
      let measured = Date().timeIntervalSince(started)
      var duration = measured
      seen.append(try check("after a full renewal"))
      let trials = 100
      var completed = 0
      var keptOld = 0
      for trial in 0..<trials {
        // One renewal measured on a quiet moment can be shorter than every later one on a busy
        // machine (once 64 ms, then all 100 kills landed before the switch): every 10 trials a
        // renewal runs to its end again, and the kills spread over the longest one seen.
        if trial > 0 && trial % 10 == 0 {
          let again = Date()
          _ = try run(["renew", "--force"], killAfter: nil)
          duration = max(duration, Date().timeIntervalSince(again))
          seen.append(try check("after a full renewal at trial \(trial)"))
        }
        let before = seen.last!
        if try run(["renew", "--force"], killAfter: duration * 1.2 * Double(trial) / Double(trials)) { completed += 1 }
        let now = try check("trial \(trial)")
        if now == before { keptOld += 1 } else { seen.append(now) }
      }
      // The store never piles up keys: at most current, previous, a pending next and bootstrap.
      let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".pem") }
      #expect(Set(files).isSubset(of: ["current.pem", "previous.pem", "next.pem", "bootstrap.pem", "anchors.pem"]))
      print(
        "kill during renewal: enrollment killed \(enrollKills) times; \(trials) renewals killed at 0-\(Int(duration * 1200)) ms "
          + "(a renewal took \(Int(measured * 1000)) ms alone): \(keptOld) kept the old credential, "
          + "\(trials - keptOld) had switched to a new one, \(completed) finished before the kill; all worked")
      #expect(keptOld > 0 && keptOld < trials, "the kills landed both before and after the switch")
      #expect(f.ra.isRunning, "clients killed mid-exchange do not take the registration authority down")
    }
  }
}

/// Records the public key of each installed credential, then passes it on.
final class Installed: @unchecked Sendable {
  private let lock = NSLock()
  private var keys: [[UInt8]] = []
  let switcher: MQTTCredentialSwitch

  init(policy: TLSPolicy) { switcher = MQTTCredentialSwitch(policy: policy, confirmationTimeout: .seconds(10)) }

  func install(_ credential: Credential, _ key: TPMKey) {
    lock.lock()
    keys.append(key.publicKey.spki)
    lock.unlock()
    switcher.install(credential, key)
  }

  var publicKeys: [[UInt8]] {
    lock.lock()
    defer { lock.unlock() }
    return keys
  }
}
