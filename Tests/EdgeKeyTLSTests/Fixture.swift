import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// One device (swtpm + a TPM key + a certificate for it) and one PKI, per test.
final class Fixture: @unchecked Sendable {
  // Declared in the order they are torn down: the key (flushed) before the TPM context before
  // swtpm, so that no TPM command goes to a port another test's swtpm may have taken since.
  let key: TPMKey
  let tpm: TPM
  let swtpm: SoftwareTPM
  let ca: TestCA
  let clientCertificatePEM: String
  let clientSerial: Int

  /// - Parameter tctiPrefix: put in front of the swtpm TCTI string, e.g. `"pcap:"`.
  init(
    _ algorithm: KeyAlgorithm = .eccP256, commonName: String = "device-0001", clientEKU: String? = "clientAuth",
    tctiPrefix: String = ""
  ) throws {
    swtpm = try SoftwareTPM()
    tpm = try TPM.open(tcti: tctiPrefix + swtpm.tcti)
    key = try tpm.loadKey(try tpm.createKey(algorithm))
    ca = try TestCA()
    let issued = try ca.issueClient(
      publicKeyDER: key.publicKey.spki, commonName: commonName, extendedKeyUsage: clientEKU)
    clientCertificatePEM = issued.certificate
    clientSerial = issued.serial
  }

  /// A server certificate from the same CA (localhost, 127.0.0.1, serverAuth).
  func server(
    _ extraArguments: [String] = [], commonName: String = "localhost",
    subjectAlternativeNames: [String] = ["DNS:localhost", "IP:127.0.0.1"], extendedKeyUsage: String? = "serverAuth",
    validFrom: TimeInterval = -3600, validFor: TimeInterval = 86400, keyType: String = "EC", issuer: TestCA? = nil,
    sendChain: Bool = true, clientCA: String? = nil
  ) throws -> OpenSSLServer {
    let signer = issuer ?? ca
    let cert = try signer.issueServer(
      commonName: commonName, subjectAlternativeNames: subjectAlternativeNames, extendedKeyUsage: extendedKeyUsage,
      validFrom: validFrom, validFor: validFor, keyType: keyType)
    return try OpenSSLServer(
      certificatePEM: cert.certificate, keyPEM: cert.key,
      chainPEM: (issuer != nil && sendChain) ? signer.certificatePEM : nil,
      clientCAPEM: clientCA ?? ca.certificatePEM, extraArguments: extraArguments)
  }

  func context(
    serverName: String = "localhost", trust: String? = nil, crl: String? = nil,
    missingCRL: TLSPolicy.MissingCRL = .fail, maximumVersion: TLSVersion = .tls13, chainPEM: String? = nil,
    alpn: [String] = [], requireServerAuth: Bool = true, acceptCMCRA: Bool = false, resumesSessions: Bool = true,
    maximumSessionAge: Duration = .seconds(3600)
  ) throws -> TLSClientContext {
    try TLSClientContext(
      certificateChain: try Certificate.chain(pem: chainPEM ?? clientCertificatePEM), key: key,
      policy: TLSPolicy(
        trustAnchorsPEM: trust ?? ca.certificatePEM, serverName: serverName, crlPEM: crl, missingCRL: missingCRL,
        maximumVersion: maximumVersion, requireServerAuth: requireServerAuth, acceptCMCRA: acceptCMCRA, alpn: alpn,
        resumesSessions: resumesSessions, maximumSessionAge: maximumSessionAge))
  }

  /// One request to s_server -www, the connection closed before it returns: s_server serves
  /// one connection at a time, so a connection kept open holds up the next one.
  func visit(_ context: TLSClientContext, port: UInt16) throws -> (
    page: String, resumed: Bool, acceptedUs: Bool, serverSubject: String?
  ) {
    let (page, connection) = try fetchPage(context, port: port)
    return (page, connection.resumedSession, connection.acceptedOurCertificate, connection.peerCertificate?.subject)
  }

  /// Whether one request (as `visit`) resumed a session.
  func resumes(_ context: TLSClientContext, port: UInt16) throws -> Bool { try visit(context, port: port).resumed }

  /// One request to s_server -www; returns the page (which describes our certificate).
  func fetchPage(_ context: TLSClientContext, port: UInt16, host: String = "localhost") throws -> (
    page: String, connection: TLSConnection
  ) {
    let connection = try TLSConnection(context: context, host: host, port: port)
    try connection.write(Array("GET / HTTP/1.0\r\n\r\n".utf8))
    let page = String(decoding: try connection.readAll(), as: UTF8.self)
    return (page, connection)
  }
}

/// Runs `body` and returns the TLSError it throws (failing the test if it throws none).
func tlsError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> TLSError? {
  do {
    try body()
    Issue.record("expected a TLSError, got success", sourceLocation: sourceLocation)
    return nil
  } catch let error as TLSError {
    if ProcessInfo.processInfo.environment["EDGEKEY_PRINT_ERRORS"] != nil { print("TLSError:", error) }
    return error
  } catch {
    Issue.record("expected a TLSError, got \(error)", sourceLocation: sourceLocation)
    return nil
  }
}
