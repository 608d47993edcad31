import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation

/// A simulated device (swtpm), a CA and the project's registration authority, per test.
final class EnrollmentFixture: @unchecked Sendable {
  // Torn down in declaration order: the TPM context before swtpm.
  let tpm: TPM
  let swtpm: SoftwareTPM
  let ca: TestCA
  let ra: RegistrationAuthority

  /// - Parameter tctiPrefix: put in front of the swtpm TCTI string, e.g. `"delay:540:"`.
  init(
    password: String? = "device:factory-secret", bootstrapCA: TestCA? = nil, lifetime: String = "30d",
    backdate: String = "60", extraArguments: [String] = [], tctiPrefix: String = ""
  ) throws {
    swtpm = try SoftwareTPM()
    tpm = try TPM.open(tcti: tctiPrefix + swtpm.tcti)
    ca = try TestCA()
    ra = try RegistrationAuthority(
      ca: ca, password: password, bootstrapCA: bootstrapCA, lifetime: lifetime, backdate: backdate,
      extraArguments: extraArguments)
  }

  var anchors: [Certificate] { get throws { try Certificate.chain(pem: ca.certificatePEM) } }

  func client(url: String? = nil, options: ESTOptions = ESTOptions()) throws -> ESTClient {
    try ESTClient(server: try ESTServer(url: url ?? ra.localhostURL), trustAnchors: try anchors, options: options)
  }

  func newKey() throws -> TPMKey { try tpm.loadKey(try tpm.createKey(.eccP256)) }

  func request(_ key: TPMKey, commonName: String = "device-0001", names: [SubjectAlternativeName] = [])
    throws -> CertificateSigningRequest
  {
    try CertificateSigningRequest(
      key: key, subject: [("O", "EdgeKey Tests"), ("CN", commonName)], subjectAlternativeNames: names)
  }

  static let password = ESTAuthentication.password(user: "device", password: "factory-secret")
}
