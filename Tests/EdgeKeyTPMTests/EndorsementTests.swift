import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

@Suite("endorsement keys and their manufacturer certificates (swtpm_setup with a local CA)")
struct EndorsementTests {
  /// The public key of a DER certificate, PEM, as OpenSSL reads it.
  func publicKey(ofCertificate der: [UInt8]) throws -> String {
    try Command.run("openssl", ["x509", "-inform", "DER", "-noout", "-pubkey"], input: Data(der))
  }

  @Test("the EK certificate in NV and the EK re-created from the default template are the same key")
  func certificateMatchesRecreatedKey() throws {
    let swtpm = try SoftwareTPM(endorsementCertificates: true)
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let der = try #require(try tpm.endorsementCertificate(.rsa2048), "swtpm_setup wrote 0x01C00002")
    let ek = try tpm.endorsementKey(.rsa2048)
    #expect(try publicKey(ofCertificate: der) == ek.pem)
    #expect(ek.attributes.rawValue == 0x0003_00B2)
    // The manufacturer CA vouches for it (OpenSSL, reading the certificate as read from NV).
    let directory = swtpm.stateDirectory
    let certificate = directory.appendingPathComponent("ek.der").path
    try Data(der).write(to: URL(fileURLWithPath: certificate))
    let pem = try Command.run("openssl", ["x509", "-inform", "DER", "-in", certificate])
    let caFile = directory.appendingPathComponent("manufacturer.pem").path
    try swtpm.manufacturerCAPEM.write(toFile: caFile, atomically: true, encoding: .utf8)
    let leaf = directory.appendingPathComponent("ek.pem").path
    try pem.write(toFile: leaf, atomically: true, encoding: .utf8)
    let verified = try Command.runCapturing(
      "openssl", ["verify", "-partial_chain", "-purpose", "any", "-CAfile", caFile, leaf])
    #expect(verified.status == 0, "\(verified.stdout)\(verified.stderr)")
    // The EK swtpm_setup persisted, read by tpm2-tools, is the one we re-create.
    let readPublic = directory.appendingPathComponent("ek-persisted.pem").path
    try Command.run(
      "tpm2_readpublic", ["-c", "0x81010001", "-f", "pem", "-o", readPublic], environment: swtpm.toolEnvironment)
    #expect(try String(contentsOfFile: readPublic, encoding: .utf8) == ek.pem)
  }

  @Test("the P-256 EK matches tpm2_createek's; a TPM without EK certificates says none")
  func eccKeyAndNoCertificate() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    #expect(try tpm.endorsementCertificate(.rsa2048) == nil)
    #expect(try tpm.endorsementCertificate(.eccP256) == nil)
    let ek = try tpm.endorsementKey(.eccP256)
    let pem = swtpm.stateDirectory.appendingPathComponent("ek-ecc.pem").path
    try Command.run(
      "tpm2_createek", ["-G", "ecc256", "-c", "-", "-u", pem, "-f", "pem"], environment: swtpm.toolEnvironment)
    #expect(try String(contentsOfFile: pem, encoding: .utf8) == ek.pem)
    #expect(try tpm.endorsementKey(.eccP256) == ek, "the same key every time")
  }

  @Test("an attestation key is restricted: tpm2-tools reads its attributes, and it is never loaded as a device key")
  func attestationKey() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let file = try tpm.createAttestationKey()
    let key = try PublicKey(marshaledPublic: file.publicBlob)
    #expect(key.attributes == ObjectAttributes.attestationKey)
    #expect(key.attributes.isNonExportable)
    #expect(key.algorithm == .eccP256)
    // An independent reader of the public area: restricted, sign, ECDSA with SHA-256.
    let blob = swtpm.stateDirectory.appendingPathComponent("ak.pub").path
    try Data(file.publicBlob.dropFirst(2)).write(to: URL(fileURLWithPath: blob))
    let shown = try Command.run("tpm2_print", ["-t", "TPMT_PUBLIC", blob], environment: swtpm.toolEnvironment)
    #expect(shown.contains("restricted"), "\(shown)")
    #expect(shown.contains("ecdsa"), "\(shown)")
    // It signs only what the TPM makes (TPM2_Certify, TPM2_Quote): TLS and CSR signing refuse it.
    let refused = #expect(throws: TPMError.self) { try tpm.loadKey(file) }
    #expect(refused?.description.contains("a device key is unrestricted") == true)
  }
}
