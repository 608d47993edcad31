import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

@testable import EdgeKeyRA

/// A fleet with attestation: swtpm manufactured with an EK certificate (swtpm_setup and
/// swtpm_localca as the TPM maker's CA), the RA trusting that CA (`--ek-ca`) and requiring
/// attestation, devices in the registry with one-time secrets.
final class AttestedFleet: @unchecked Sendable {
  let ca: TestCA
  let ra: RegistrationAuthority
  let manufacturer: SoftwareTPM

  /// - Parameter issuingCAOnly: give the RA the maker's issuing CA without its root (an
  ///   operator who has only that).
  init(lifetime: String = "1h", requireAttestation: Bool = true, issuingCAOnly: Bool = false) throws {
    manufacturer = try SoftwareTPM(endorsementCertificates: true)
    ca = try TestCA()
    let makerCA =
      issuingCAOnly
      ? try Certificate.chain(pem: manufacturer.manufacturerCAPEM)[0].pem : manufacturer.manufacturerCAPEM
    ra = try RegistrationAuthority(
      ca: ca, password: nil, lifetime: lifetime, manufacturerCAs: [makerCA], requireAttestation: requireAttestation)
  }

  /// A device on its own swtpm (made by `manufacturer`'s CA unless given), registered with a secret.
  final class Device: @unchecked Sendable {
    let swtpm: SoftwareTPM
    let tpm: TPM
    let id: String
    let secret: String
    let store: CredentialStore
    let settings: EnrollmentSettings

    init(_ fleet: AttestedFleet, id: String, swtpm: SoftwareTPM? = nil) throws {
      self.swtpm = try swtpm ?? SoftwareTPM(endorsementCertificates: true, manufacturer: fleet.manufacturer)
      tpm = try TPM.open(tcti: self.swtpm.tcti)
      self.id = id
      secret = "secret-of-\(id)"
      try fleet.ra.importManifest([RegistrationAuthority.manifestLine(serial: id, name: id, secret: secret)])
      store = try CredentialStore(directory: self.swtpm.stateDirectory.appendingPathComponent("state-\(id)").path)
      settings = EnrollmentSettings(
        server: try ESTServer(url: fleet.ra.localhostURL),
        trustAnchors: try Certificate.chain(pem: fleet.ca.certificatePEM),
        password: (id, secret))
    }

    func agent(attest: Bool = true) -> RenewalAgent {
      var policy = RenewalPolicy()
      policy.attest = attest
      return RenewalAgent(
        store: store, tpm: tpm, settings: settings, policy: policy,
        identity: (subject: [("O", "EdgeKey Tests"), ("CN", id)], names: []))
    }

    func client() throws -> ESTClient {
      try ESTClient(server: settings.server, trustAnchors: settings.trustAnchors)
    }

    var secretAuthentication: ESTAuthentication { .password(user: id, password: secret) }

    /// The current certificate as the TLS client identity.
    func certificateAuthentication() throws -> ESTAuthentication {
      let current = try #require(try store.read(.current))
      return .certificate(current.chain, key: try tpm.loadKey(current.key))
    }

    func attestationKey() throws -> AttestationKey {
      try tpm.loadAttestationKey(try #require(try store.attestationKey()))
    }

    func request(_ key: TPMKey, attestation: KeyAttestation?) throws -> CertificateSigningRequest {
      try CertificateSigningRequest(key: key, subject: [("O", "EdgeKey Tests"), ("CN", id)], attestation: attestation)
    }
  }

  /// The issuance log lines that say the key was attested.
  var attestedIssuances: Int {
    ra.issuanceLog.filter { $0.contains("\"keyAttestation\":\"verified: TPM2_Certify") }.count
  }
}

@Suite("key attestation: the RA signs only keys proven to be in a genuine TPM")
struct AttestationTests {
  @Test("provisioning with attestation, then three rotations: every key certified by the activated AK and verified")
  func happyPath() throws {
    let fleet = try AttestedFleet(lifetime: "1h")
    let device = try AttestedFleet.Device(fleet, id: "device-0001")
    let agent = device.agent()
    let first = try agent.renew()
    #expect(first.certificate?.commonName == "device-0001")
    let status = AttestationStatus.read(device.store)
    #expect(status.state == "activated", "\(status)")
    #expect(status.certificate?.subject == "CN=device-0001")
    var keys: Set<String> = [try first.credential.key.publicKey().fingerprint]
    for _ in 0..<3 {
      let renewed = try agent.renew()
      keys.insert(try renewed.credential.key.publicKey().fingerprint)
    }
    #expect(keys.count == 4, "every rotation made a new key")
    #expect(fleet.ra.issuanceLog.count == 4)
    #expect(fleet.attestedIssuances == 4, "\(fleet.ra.issuanceLog)")
    #expect(agent.counters.attested == 4)
    // One AK for the device, in the registry and in its store; the RA's log says activated once.
    let shown = try fleet.ra.admin(["show", "device-0001"]).output
    #expect(shown.contains("TPM: EK SHA-256"), "\(shown)")
    #expect(shown.components(separatedBy: "attestation key activated").count - 1 == 1, "\(shown)")
    let akCertificate = try #require(try device.store.attestationCertificates().first)
    #expect(shown.contains(akCertificate.serialNumber))
    #expect(akCertificate.extendedKeyUsageOIDs == ["2.23.133.8.3"], "an AK certificate is never a TLS client's")
    #expect(!akCertificate.allowsClientAuth)
    // The RA's csrattrs asks for key attestation, and the client understands it.
    let asked = try device.client().requestedAttributes()
    #expect(asked?.keyAttestation == true)
    #expect(asked?.notUnderstood == [], "\(String(describing: asked))")
  }

  @Test("provision --attest on a device enrolled without it: activated, enrolled again attested; no way back")
  func provisionAttestsLater() throws {
    let fleet = try AttestedFleet(requireAttestation: false, issuingCAOnly: true)
    let device = try AttestedFleet.Device(fleet, id: "device-0001")
    let server = try fleet.ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: fleet.ca.certificatePEM)
    let work = device.swtpm.stateDirectory.path
    let caFile = work + "/ca.pem"
    try fleet.ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
    var environment = ProcessInfo.processInfo.environment
    environment["EST_PASSWORD"] = "\(device.id):\(device.secret)"
    let common = [
      "--state", device.store.directory, "--server", fleet.ra.localhostURL, "--cafile", caFile, "--tcti",
      device.swtpm.tcti, "--password-env", "EST_PASSWORD", "--subject", "O=EdgeKey Tests,CN=device-0001",
    ]
    let edgekey = try builtExecutable("edgekey")
    let plain = try Command.runCapturing(edgekey, ["enroll"] + common, environment: environment)
    #expect(plain.status == 0, "\(plain.stderr)")
    #expect(fleet.ra.issuanceLog.last?.contains("\"keyAttestation\":\"none\"") == true)
    _ = try device.tpm.flushAllTransientObjects()
    let provisioned = try Command.runCapturing(
      edgekey, ["provision", "--attest", "-h", "127.0.0.1", "-p", String(broker.port)] + common,
      environment: environment)
    #expect(provisioned.status == 0, "\(provisioned.stdout)\(provisioned.stderr)")
    #expect(provisioned.stdout.contains("\"ok\":true"), "\(provisioned.stdout)")
    #expect(provisioned.stdout.contains("\"attestation\":{\"state\":\"activated\""), "\(provisioned.stdout)")
    #expect(fleet.ra.issuanceLog.count == 2)
    #expect(fleet.attestedIssuances == 1)
    // Once activated, a request without evidence is refused for this device.
    _ = try device.tpm.flushAllTransientObjects()
    let key = try device.tpm.loadKey(try device.tpm.createKey())
    let refused = #expect(throws: EnrollmentError.self) {
      try device.client().reenroll(
        try device.request(key, attestation: nil), authentication: try device.certificateAuthentication())
    }
    #expect(
      refused?.description.contains("it has an activated attestation key") == true, "\(String(describing: refused))")
  }

  @Test(
    "refused, each with its reason, nothing issued: software key, replay, another device's AK, wrong key, no AK, clone")
  func refusals() throws {
    let fleet = try AttestedFleet()
    let device = try AttestedFleet.Device(fleet, id: "device-0001")
    _ = try device.agent().renew()
    #expect(fleet.ra.issuanceLog.count == 1)
    let client = try device.client()
    let auth = try device.certificateAuthentication()
    let ak = try device.attestationKey()

    func refused(_ csr: CertificateSigningRequest, _ reason: String, renewal: Bool = true) throws {
      let error = #expect(throws: EnrollmentError.self) {
        renewal ? try client.reenroll(csr, authentication: auth) : try client.enroll(csr, authentication: auth)
      }
      #expect(error?.kind == .server(403), "\(String(describing: error))")
      #expect(error?.description.contains(reason) == true, "\(reason) — got: \(String(describing: error))")
    }

    // A software key with a valid one-time secret: no evidence at all.
    let other = try AttestedFleet.Device(fleet, id: "device-0002")
    let probe = try ESTProbe(fleet.ra)
    let software = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-0002")]),
      basic: "device-0002:\(other.secret)")
    #expect(software.status == 403)
    #expect(software.body.contains("must prove its key is in its TPM"), "\(software.body)")

    // Evidence replayed: accepted once, refused the second time.
    let key = try device.tpm.loadKey(try device.tpm.createKey())
    let nonce = try client.attestationNonce(authentication: auth)
    let evidence = KeyAttestation(
      evidence: try key.certify(by: ak, qualifyingData: nonce),
      certificates: try device.store.attestationCertificates().map(\.der))
    _ = try client.reenroll(try device.request(key, attestation: evidence), authentication: auth)
    #expect(fleet.attestedIssuances == 2)
    try refused(try device.request(key, attestation: evidence), "was used already (a replay?)")

    // A nonce from nowhere.
    let made = KeyAttestation(
      evidence: try key.certify(by: ak, qualifyingData: Array(repeating: 7, count: 32)),
      certificates: evidence.certificates)
    try refused(try device.request(key, attestation: made), "is not one this RA gave out")

    // The CSR's key is not the certified one.
    let certified = try device.tpm.loadKey(try device.tpm.createKey())
    let wrong = KeyAttestation(
      evidence: try certified.certify(by: ak, qualifyingData: try client.attestationNonce(authentication: auth)),
      certificates: evidence.certificates)
    try refused(try device.request(key, attestation: wrong), "the certified key is not the request's key")

    // An AK never activated here: no certificate of this CA for it.
    let stray = try device.tpm.loadAttestationKey(try device.tpm.createAttestationKey())
    let unactivated = KeyAttestation(
      evidence: try key.certify(by: stray, qualifyingData: try client.attestationNonce(authentication: auth)),
      certificates: [])
    try refused(try device.request(key, attestation: unactivated), "no attestation key certificate from this CA")

    // Another device's AK (device-0002 activated its own, on its own TPM), for a key in that
    // TPM, asking as device-0001.
    _ = try other.agent().renew()
    let foreignKey = try other.tpm.loadKey(try other.tpm.createKey())
    let foreign = KeyAttestation(
      evidence: try foreignKey.certify(
        by: try other.attestationKey(), qualifyingData: try client.attestationNonce(authentication: auth)),
      certificates: try other.store.attestationCertificates().map(\.der))
    try refused(try device.request(foreignKey, attestation: foreign), "signed by another device's attestation key")

    // A clone: device-0003 with device-0001's TPM (the same EK) cannot activate.
    let clone = try AttestedFleet.Device(fleet, id: "device-0003", swtpm: device.swtpm)
    let cloned = #expect(throws: EnrollmentError.self) { try clone.agent().renew() }
    #expect(
      cloned?.description.contains("registered to device \"device-0001\"") == true, "\(String(describing: cloned))")

    // A TPM whose EK certificate is from a maker the RA does not know.
    let unknown = try AttestedFleet.Device(
      fleet, id: "device-0004", swtpm: try SoftwareTPM(endorsementCertificates: true))
    let strange = #expect(throws: EnrollmentError.self) { try unknown.agent().renew() }
    #expect(
      strange?.description.contains("not from a known TPM manufacturer") == true, "\(String(describing: strange))")

    #expect(fleet.ra.issuanceLog.count == 3, "device-0001 twice, device-0002 once: \(fleet.ra.issuanceLog)")
    #expect(fleet.attestedIssuances == 3)
  }

  /// TPM2_Certify with qualifying data as a raw command (tpm2-tools 5.4's tpm2_certify has no
  /// option for it): both objects persistent, password sessions with empty auth.
  static func certifyCommand(object: UInt32, signer: UInt32, nonce: [UInt8]) -> [UInt8] {
    func u32(_ v: UInt32) -> [UInt8] {
      [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)]
    }
    func u16(_ v: Int) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
    let password: [UInt8] = u32(0x4000_0009) + u16(0) + [0x01] + u16(0)
    let authorization = password + password
    let parameters = u16(nonce.count) + nonce + u16(0x0010)  // qualifyingData, inScheme TPM_ALG_NULL
    let body = u32(object) + u32(signer) + u32(UInt32(authorization.count)) + authorization + parameters
    return u16(0x8002) + u32(UInt32(10 + body.count)) + u32(0x0000_0148) + body
  }

  /// The TPM2B_ATTEST and TPMT_SIGNATURE of a TPM2_Certify response.
  static func certifyResponse(_ r: [UInt8]) throws -> (attest: [UInt8], signature: [UInt8]) {
    try #require(
      r.count > 16 && r[6..<10] == [0, 0, 0, 0],
      "TPM2_Certify answered \(r.prefix(10).map { String(format: "%02x", $0) }.joined())")
    let parameterSize = Int(r[10]) << 24 | Int(r[11]) << 16 | Int(r[12]) << 8 | Int(r[13])
    let parameters = Array(r[14..<(14 + parameterSize)])
    let attestLength = Int(parameters[0]) << 8 | Int(parameters[1])
    return (Array(parameters[2..<(2 + attestLength)]), Array(parameters[(2 + attestLength)...]))
  }

  @Test(
    "tpm2-tools: TPM2_Certify over our nonce by tpm2_send is verified and issued; a key tpm2_create made duplicable is refused"
  )
  func interoperatesWithTPM2Tools() throws {
    let fleet = try AttestedFleet()
    let device = try AttestedFleet.Device(fleet, id: "device-0001")
    try device.tpm.persistStorageRootKey()
    _ = try device.agent().renew()
    let client = try device.client()
    let auth = try device.certificateAuthentication()
    let env = device.swtpm.toolEnvironment
    let directory = device.swtpm.stateDirectory
    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    func write(_ bytes: [UInt8], _ name: String) throws -> String {
      try Data(bytes).write(to: URL(fileURLWithPath: path(name)))
      return path(name)
    }
    let keyFile = try device.tpm.createKey()
    let akFile = try #require(try device.store.attestationKey())
    let nonce = try client.attestationNonce(authentication: auth)
    // swtpm has three object slots and no resource manager: tpm2-tools needs them now.
    _ = try device.tpm.flushAllTransientObjects()
    // tpm2-tools loads and persists both objects; the TPM answers our command bytes.
    for (file, name, handle) in [(keyFile, "key", "0x81000010"), (akFile, "ak", "0x81000011")] {
      let loaded = try Command.runCapturing(
        "tpm2_load",
        [
          "-C", "0x81000001", "-u", try write(file.publicBlob, "\(name).pub"), "-r",
          try write(file.privateBlob, "\(name).priv"),
          "-c", path("\(name).ctx"),
        ], environment: env)
      try #require(loaded.status == 0, "\(loaded.stderr)")
      try Command.run("tpm2_evictcontrol", ["-C", "o", "-c", path("\(name).ctx"), handle], environment: env)
      // Without a resource manager, tpm2-tools leaves what it loaded in the TPM.
      try Command.run("tpm2_flushcontext", ["-t"], environment: env)
    }
    let command = try write(Self.certifyCommand(object: 0x8100_0010, signer: 0x8100_0011, nonce: nonce), "certify.bin")
    try Command.run("tpm2_send", ["-o", path("certify.rsp"), command], environment: env)
    let (attest, signature) = try Self.certifyResponse(
      Array(try Data(contentsOf: URL(fileURLWithPath: path("certify.rsp")))))
    let key = try device.tpm.loadKey(keyFile)
    let chain = try device.store.attestationCertificates().map(\.der)
    let theirs = KeyAttestation(
      evidence: CertifyEvidence(attest: attest, signature: signature, certifiedPublicArea: key.publicKey.publicArea),
      certificates: chain)
    _ = try client.reenroll(try device.request(key, attestation: theirs), authentication: auth)
    #expect(fleet.attestedIssuances == 2, "\(fleet.ra.issuanceLog)")

    // tpm2_certify itself (5.4 takes no qualifying data and always sends 00 ff 55 aa): its
    // TPMS_ATTEST and signature verify, and the RA refuses it for the nonce.
    _ = try device.tpm.flushAllTransientObjects()
    try Command.run(
      "tpm2_certify",
      ["-c", "0x81000010", "-C", "0x81000011", "-g", "sha256", "-o", path("attest.bin"), "-s", path("sig.bin")],
      environment: env)
    let plain = KeyAttestation(
      evidence: CertifyEvidence(
        attest: Array(try Data(contentsOf: URL(fileURLWithPath: path("attest.bin")))),
        signature: Array(try Data(contentsOf: URL(fileURLWithPath: path("sig.bin")))),
        certifiedPublicArea: key.publicKey.publicArea), certificates: chain)
    let csr = try device.request(key, attestation: plain)
    let verified = try EvidenceVerifier.verify(
      plain, for: csr, anchors: try Certificate.chain(pem: fleet.ca.certificatePEM))
    #expect(verified.nonce == [0x00, 0xFF, 0x55, 0xAA])
    let refused = #expect(throws: EnrollmentError.self) { try client.reenroll(csr, authentication: auth) }
    #expect(refused?.description.contains("is not one this RA gave out") == true, "\(String(describing: refused))")

    // A key tpm2_create made without fixedTPM and fixedParent (duplicable), certified by the AK.
    _ = try device.tpm.flushAllTransientObjects()
    for handle in ["0x81000010", "0x81000011"] {
      try Command.run("tpm2_evictcontrol", ["-C", "o", "-c", handle], environment: env)
    }
    try Command.run(
      "tpm2_create",
      [
        "-C", "0x81000001", "-G", "ecc256", "-a", "sign|userwithauth|sensitivedataorigin|noda", "-u", path("dup.pub"),
        "-r", path("dup.priv"),
      ], environment: env)
    try Command.run("tpm2_flushcontext", ["-t"], environment: env)
    let duplicable = try device.tpm.loadKey(
      TSS2PrivateKey(
        emptyAuth: true, publicBlob: Array(try Data(contentsOf: URL(fileURLWithPath: path("dup.pub")))),
        privateBlob: Array(try Data(contentsOf: URL(fileURLWithPath: path("dup.priv"))))))
    #expect(!duplicable.publicKey.attributes.isNonExportable)
    let evidence = try duplicable.certify(
      by: try device.attestationKey(), qualifyingData: try client.attestationNonce(authentication: auth))
    let dup = #expect(throws: EnrollmentError.self) {
      try client.reenroll(
        try device.request(duplicable, attestation: KeyAttestation(evidence: evidence, certificates: chain)),
        authentication: auth)
    }
    #expect(dup?.kind == .server(403))
    #expect(
      dup?.description.contains("can leave its TPM or was not made in it: no fixedTPM, fixedParent") == true,
      "\(String(describing: dup))")
    #expect(fleet.attestedIssuances == 2)
  }
}

@Suite("attestation killed at many points (SIGKILL of the edgekey CLI)")
struct KillDuringAttestationTests {
  @Test(
    "killed during activation and during certify, the device resumes: one AK, every key with its certificate, every issuance attested"
  )
  func killAnywhere() async throws {
    // On a thread of its own: it blocks for long (see onOwnThread).
    try await onOwnThread {
      let fleet = try AttestedFleet(lifetime: "1h")
      let device = try AttestedFleet.Device(fleet, id: "device-0001")
      let work = device.swtpm.stateDirectory.path
      let caFile = work + "/ca.pem"
      try fleet.ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
      let edgekey = try builtExecutable("edgekey")
      let common = [
        "--state", device.store.directory, "--server", fleet.ra.localhostURL, "--cafile", caFile, "--tcti",
        device.swtpm.tcti, "--password-env", "EST_PASSWORD",
      ]
      var environment = ProcessInfo.processInfo.environment
      environment["EST_PASSWORD"] = "\(device.id):\(device.secret)"
      let log = work + "/cli.log"

      func run(_ words: [String], killAfter delay: Double?) throws -> Bool {
        let p = try ChildProcess(edgekey, words + common, logPath: log, environment: environment)
        guard let delay else {
          #expect(p.wait() == 0, "\(words): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
          return true
        }
        let deadline = Date().addingTimeInterval(delay)
        while p.isRunning && Date() < deadline { usleep(500) }
        let finished = !p.isRunning
        p.kill9()
        _ = p.wait()
        return finished
      }

      /// Whatever the moment: the AK certificate (if any) is for the AK file, and current.pem
      /// (if any) holds a certificate for its key.
      func checkStore(_ trial: String) throws {
        let store = try CredentialStore(directory: device.store.directory)
        let files = try FileManager.default.contentsOfDirectory(atPath: store.directory).filter {
          !$0.contains(".tmp-")
        }
        #expect(
          Set(files).isSubset(of: [
            "current.pem", "next.pem", "previous.pem", "anchors.pem", "attestation-key.pem", "attestation-key.crt",
          ]), "\(trial): \(files)")
        if let first = try store.attestationCertificates().first {
          #expect(first.publicKeyDER == (try store.attestationKey()?.publicKey().spki), "\(trial)")
        }
        if let current = try store.read(.current) { #expect(current.isComplete, "\(trial)") }
        // A restarted device on a direct TCTI flushes what the killed process left loaded.
        _ = try device.tpm.flushAllTransientObjects()
      }

      // Provisioning with attestation (EK certificate, AK, activation, certify, enroll), killed at
      // delays growing by half each time, so that kills land in every step, until one run completes.
      var delay = 0.03
      var activationKills = 0
      while try !run(["enroll", "--attest", "--subject", "O=EdgeKey Tests,CN=device-0001"], killAfter: delay) {
        activationKills += 1
        try checkStore("enrollment kill \(activationKills)")
        delay *= 1.5
      }
      try checkStore("after enrollment")

      // Renewals (a fresh nonce, TPM2_Certify, the request), killed at points spread over a run.
      let started = Date()
      _ = try run(["renew", "--force"], killAfter: nil)
      let duration = Date().timeIntervalSince(started)
      let trials = 16
      for trial in 0..<trials {
        _ = try run(["renew", "--force"], killAfter: duration * 1.2 * Double(trial) / Double(trials))
        try checkStore("renewal trial \(trial)")
      }
      _ = try run(["renew", "--force"], killAfter: nil)
      try checkStore("at the end")

      // One AK ever: every activation the registry recorded names the same AK, the one stored.
      let audit = try fleet.ra.admin(["audit", "device-0001", "--limit", "1000"]).output
      let activations = audit.split(separator: "\n").filter { $0.contains("attestation key activated") }
      let names = Set(activations.compactMap { $0.components(separatedBy: "AK name ").dropFirst().first?.prefix(20) })
      #expect(activations.count >= 1 && names.count == 1, "\(activations)")
      let stored = try #require(try device.store.attestationKey()).publicKey().name.map { String(format: "%02x", $0) }
      #expect(names.first.map { stored.joined().hasPrefix($0) } == true)
      // Every certificate the RA issued was for an attested key (the RA requires it).
      #expect(!fleet.ra.issuanceLog.isEmpty)
      #expect(fleet.attestedIssuances == fleet.ra.issuanceLog.count, "\(fleet.ra.issuanceLog)")
      // What the device's tools say of it.
      _ = try device.tpm.flushAllTransientObjects()
      let status = try Command.runCapturing(edgekey, ["status", "--state", device.store.directory, "--json"])
      #expect(status.stdout.contains("\"attestation\":{\"state\":\"activated\""), "\(status.stdout)\(status.stderr)")
      let info = try Command.runCapturing(
        edgekey, ["tpm", "info", "--json", "--state", device.store.directory, "--tcti", device.swtpm.tcti])
      #expect(info.stdout.contains("\"attestation\":{\"state\":\"activated\""), "\(info.stdout)\(info.stderr)")
      #expect(info.stdout.contains("\"matchesKey\":true"), "the EK certificate is for this TPM's EK")
      #expect(info.stdout.contains("\"tpm\":\"id:"), "the TPM the EK certificate names: \(info.stdout)")
      print(
        "kill during attestation: enrollment with activation killed \(activationKills) times; \(trials) renewals killed "
          + "at 0-\(Int(duration * 1200)) ms (one takes \(Int(duration * 1000)) ms); \(activations.count) activation(s) of one AK, "
          + "\(fleet.ra.issuanceLog.count) attested issuances")
    }
  }
}
