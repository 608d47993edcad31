import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

@testable import EdgeKeyRA

/// TPM2_MakeCredential in software against the TPM's TPM2_ActivateCredential: ours on both
/// sides, and each side against tpm2-tools' (`tpm2_makecredential -T none`,
/// `tpm2_activatecredential` with the EK's policy session).
@Suite("credential activation: software MakeCredential, the TPM's ActivateCredential")
struct CredentialActivationTests {
  /// tpm2-tools' credential file: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT,
  /// TPM2B_ENCRYPTED_SECRET.
  static func toolsFile(_ c: CredentialChallenge) -> [UInt8] {
    [0xBA, 0xDC, 0xC0, 0xDE, 0, 0, 0, 1] + c.credentialBlob + c.encryptedSecret
  }

  static func fromToolsFile(_ bytes: [UInt8]) throws -> CredentialChallenge {
    try #require(bytes.count > 12 && bytes.prefix(8) == [0xBA, 0xDC, 0xC0, 0xDE, 0, 0, 0, 1])
    let blobLength = Int(bytes[8]) << 8 | Int(bytes[9])
    let blob = Array(bytes[8..<(10 + blobLength)])
    let secret = Array(bytes[(10 + blobLength)...])
    try #require(secret.count >= 2 && Int(secret[0]) << 8 | Int(secret[1]) == secret.count - 2)
    return CredentialChallenge(credentialBlob: blob, encryptedSecret: secret)
  }

  @Test("a credential made in software for the AK and the RSA EK certificate is released by that TPM only")
  func rsaRoundTrip() throws {
    let swtpm = try SoftwareTPM(endorsementCertificates: true)
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let ak = try tpm.loadAttestationKey(try tpm.createAttestationKey())
    let ekCertificate = try Certificate(der: try #require(try tpm.endorsementCertificate(.rsa2048)))
    let secret = Array("the AK is in this TPM, 32 bytes!".utf8)
    let challenge = try CredentialProtection.makeCredential(
      credential: secret, objectName: ak.name, endorsementKeySPKI: ekCertificate.publicKeyDER)
    #expect(try ak.activateCredential(challenge, endorsementKey: .rsa2048) == secret)

    // Made for another key's Name: the TPM refuses it (the integrity HMAC covers the Name).
    let other = try tpm.loadAttestationKey(try tpm.createAttestationKey())
    let forOther = try CredentialProtection.makeCredential(
      credential: secret, objectName: other.name, endorsementKeySPKI: ekCertificate.publicKeyDER)
    let refused = #expect(throws: TPMError.self) { try ak.activateCredential(forOther, endorsementKey: .rsa2048) }
    #expect(refused?.code == .credentialRejected, "\(String(describing: refused))")
    // A flipped bit anywhere in the blob is refused, never a wrong secret.
    var tampered = challenge
    tampered.credentialBlob[tampered.credentialBlob.count - 1] ^= 1
    #expect(throws: TPMError.self) { try ak.activateCredential(tampered, endorsementKey: .rsa2048) }
  }

  @Test("with the ECC P-256 EK (ECDH and KDFe) the TPM releases the credential too")
  func eccRoundTrip() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let ak = try tpm.loadAttestationKey(try tpm.createAttestationKey())
    let ek = try tpm.endorsementKey(.eccP256)
    let secret: [UInt8] = Array(0..<32)
    let challenge = try CredentialProtection.makeCredential(
      credential: secret, objectName: ak.name, endorsementKeySPKI: ek.spki)
    #expect(try ak.activateCredential(challenge, endorsementKey: .eccP256) == secret)
    #expect(throws: TPMError.self) { try ak.activateCredential(challenge, endorsementKey: .rsa2048) }
  }

  @Test("tpm2_makecredential -T none for our AK is activated by us; ours is activated by tpm2_activatecredential")
  func interoperatesWithTPM2Tools() throws {
    let swtpm = try SoftwareTPM(endorsementCertificates: true)
    let tpm = try TPM.open(tcti: swtpm.tcti)
    try tpm.persistStorageRootKey()
    let akFile = try tpm.createAttestationKey()
    let akName = try akFile.publicKey().name
    let directory = swtpm.stateDirectory
    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    let ek = try tpm.endorsementKey(.rsa2048)
    try ek.pem.write(toFile: path("ek.pem"), atomically: true, encoding: .utf8)
    let secret = Array("made by tpm2-tools".utf8)
    try Data(secret).write(to: URL(fileURLWithPath: path("secret.bin")))
    let hexName = akName.map { String(format: "%02x", $0) }.joined()
    try Command.run(
      "tpm2_makecredential",
      [
        "-T", "none", "-u", path("ek.pem"), "-G", "rsa", "-s", path("secret.bin"), "-n", hexName, "-o",
        path("cred.out"),
      ])
    let theirs = try Self.fromToolsFile(Array(try Data(contentsOf: URL(fileURLWithPath: path("cred.out")))))
    do {
      // Loaded only here: swtpm has three object slots, and tpm2-tools needs two below.
      let ak = try tpm.loadAttestationKey(akFile)
      #expect(try ak.activateCredential(theirs, endorsementKey: .rsa2048) == secret)
    }

    // Ours, activated by tpm2-tools with the EK swtpm_setup persisted and its policy session.
    let ours = try CredentialProtection.makeCredential(
      credential: Array("made by EdgeKey".utf8), objectName: akName, endorsementKeySPKI: ek.spki)
    try Data(Self.toolsFile(ours)).write(to: URL(fileURLWithPath: path("ours.out")))
    try Data(akFile.publicBlob).write(to: URL(fileURLWithPath: path("ak.pub")))
    try Data(akFile.privateBlob).write(to: URL(fileURLWithPath: path("ak.priv")))
    let env = swtpm.toolEnvironment
    try Command.run(
      "tpm2_load", ["-C", "0x81000001", "-u", path("ak.pub"), "-r", path("ak.priv"), "-c", path("ak.ctx")],
      environment: env)
    try Command.run("tpm2_startauthsession", ["--policy-session", "-S", path("session.ctx")], environment: env)
    try Command.run("tpm2_policysecret", ["-S", path("session.ctx"), "-c", "e"], environment: env)
    let activated = try Command.runCapturing(
      "tpm2_activatecredential",
      [
        "-c", path("ak.ctx"), "-C", "0x81010001", "-i", path("ours.out"), "-o", path("released.bin"),
        "-P", "session:\(path("session.ctx"))",
      ], environment: env)
    try #require(activated.status == 0, "\(activated.stderr)")
    try Command.run("tpm2_flushcontext", [path("session.ctx")], environment: env)
    let released = try Data(contentsOf: URL(fileURLWithPath: path("released.bin")))
    #expect(Array(released) == Array("made by EdgeKey".utf8))
  }
}
