import COpenSSL
import Foundation

/// A certificate authority for tests, built with OpenSSL's C API so that every odd case the
/// mTLS guide lists (expired, not yet valid, wrong EKU, revoked, missing intermediate) is one
/// call away. Keys are software keys: this plays the CA and the servers, never the device.
public final class TestCA: @unchecked Sendable {
  // @unchecked: used by one test at a time; `nextSerial` is only touched under `lock`.
  public let key: OpaquePointer
  public let certificate: OpaquePointer
  public let name: String
  /// This CA certificate's serial number (to revoke an intermediate in its issuer's CRL).
  public let serialNumber: Int
  private let lock = NSLock()
  private var nextSerial: Int = 100

  /// A self-signed root.
  public init(name: String = "EdgeKey Test Root CA") throws {
    self.name = name
    serialNumber = 1
    key = try TestCA.generateKey()
    certificate = try TestCA.makeCertificate(
      subject: name, publicKey: key, issuerName: name, issuerKey: key, serial: 1, isCA: true,
      notBefore: -3600, notAfter: 86400 * 365, extendedKeyUsage: nil, subjectAlternativeNames: [])
  }

  private init(name: String, key: OpaquePointer, certificate: OpaquePointer, serial: Int) {
    self.name = name
    self.serialNumber = serial
    self.key = key
    self.certificate = certificate
  }

  deinit {
    X509_free(certificate)
    EVP_PKEY_free(key)
  }

  /// An intermediate CA under this one.
  public func intermediate(name: String = "EdgeKey Test Issuing CA") throws -> TestCA {
    let key = try TestCA.generateKey()
    let serial = serial()
    let cert = try TestCA.makeCertificate(
      subject: name, publicKey: key, issuerName: self.name, issuerKey: self.key, serial: serial, isCA: true,
      notBefore: -3600, notAfter: 86400 * 365, extendedKeyUsage: nil, subjectAlternativeNames: [])
    return TestCA(name: name, key: key, certificate: cert, serial: serial)
  }

  /// A link certificate for a CA rollover (RFC 4210 §4.4): `other`'s name and key, issued by
  /// this CA ("NewWithOld" when this is the old root and `other` the new one). PEM.
  public func crossCertify(_ other: TestCA) throws -> String {
    let cert = try TestCA.makeCertificate(
      subject: other.name, publicKey: other.key, issuerName: name, issuerKey: key, serial: serial(), isCA: true,
      notBefore: -3600, notAfter: 86400 * 365, extendedKeyUsage: nil, subjectAlternativeNames: [])
    defer { X509_free(cert) }
    return TestCA.pem(cert)
  }

  /// A leaf certificate for a new software key (servers). Returns (certificate PEM, key PEM).
  public func issueServer(
    commonName: String = "localhost", subjectAlternativeNames: [String] = ["DNS:localhost", "IP:127.0.0.1"],
    extendedKeyUsage: String? = "serverAuth", validFrom: TimeInterval = -3600, validFor: TimeInterval = 86400,
    keyType: String = "EC"
  ) throws -> (certificate: String, key: String, serial: Int) {
    let key = try TestCA.generateKey(keyType)
    defer { EVP_PKEY_free(key) }
    let serial = serial()
    let cert = try TestCA.makeCertificate(
      subject: commonName, publicKey: key, issuerName: name, issuerKey: self.key, serial: serial, isCA: false,
      notBefore: validFrom, notAfter: validFrom + validFor, extendedKeyUsage: extendedKeyUsage,
      subjectAlternativeNames: subjectAlternativeNames)
    defer { X509_free(cert) }
    return (TestCA.pem(cert), TestCA.privateKeyPEM(key), serial)
  }

  /// An issuing CA certificate under this one for a public key given as SubjectPublicKeyInfo
  /// DER (a CA key held in a TPM). PEM.
  public func issueCA(publicKeyDER: [UInt8], name caName: String) throws -> String {
    let key: OpaquePointer? = publicKeyDER.withUnsafeBufferPointer {
      var p = $0.baseAddress
      return d2i_PUBKEY(nil, &p, $0.count)
    }
    guard let key else { throw HarnessError("not a SubjectPublicKeyInfo") }
    defer { EVP_PKEY_free(key) }
    let cert = try TestCA.makeCertificate(
      subject: caName, publicKey: key, issuerName: name, issuerKey: self.key, serial: serial(), isCA: true,
      notBefore: -3600, notAfter: 86400 * 365, extendedKeyUsage: nil, subjectAlternativeNames: [])
    defer { X509_free(cert) }
    return TestCA.pem(cert)
  }

  /// A leaf certificate for a public key given as SubjectPublicKeyInfo DER (the device's TPM key).
  public func issueClient(
    publicKeyDER: [UInt8], commonName: String, extendedKeyUsage: String? = "clientAuth",
    validFrom: TimeInterval = -3600, validFor: TimeInterval = 86400, subjectAlternativeNames: [String] = []
  ) throws -> (certificate: String, serial: Int) {
    let key: OpaquePointer? = publicKeyDER.withUnsafeBufferPointer {
      var p = $0.baseAddress
      return d2i_PUBKEY(nil, &p, $0.count)
    }
    guard let key else { throw HarnessError("not a SubjectPublicKeyInfo") }
    defer { EVP_PKEY_free(key) }
    let serial = serial()
    let cert = try TestCA.makeCertificate(
      subject: commonName, publicKey: key, issuerName: name, issuerKey: self.key, serial: serial, isCA: false,
      notBefore: validFrom, notAfter: validFrom + validFor, extendedKeyUsage: extendedKeyUsage,
      subjectAlternativeNames: subjectAlternativeNames)
    defer { X509_free(cert) }
    return (TestCA.pem(cert), serial)
  }

  /// A client certificate for a new software key (another party: a test's subscriber). The
  /// caller owns the returned EVP_PKEY.
  public func issueSoftwareClient(commonName: String) throws -> (certificate: String, key: OpaquePointer) {
    let key = try TestCA.generateKey()
    var spki: UnsafeMutablePointer<UInt8>?
    let n = i2d_PUBKEY(key, &spki)
    let der = Array(UnsafeBufferPointer(start: spki, count: Int(max(n, 0))))
    CRYPTO_free(spki, #file, #line)
    do {
      return (try issueClient(publicKeyDER: der, commonName: commonName).certificate, key)
    } catch {
      EVP_PKEY_free(key)
      throw error
    }
  }

  /// This CA's certificate, PEM.
  public var certificatePEM: String { TestCA.pem(certificate) }

  /// A CRL from this CA revoking `serials`.
  public func crl(revoking serials: [Int]) throws -> String {
    guard let crl = X509_CRL_new() else { throw HarnessError("X509_CRL_new") }
    defer { X509_CRL_free(crl) }
    X509_CRL_set_version(crl, 1)
    X509_CRL_set_issuer_name(crl, X509_get_subject_name(certificate))
    let now = ASN1_TIME_set(nil, time(nil) - 60)
    let next = ASN1_TIME_set(nil, time(nil) + 86400)
    defer {
      ASN1_TIME_free(now)
      ASN1_TIME_free(next)
    }
    X509_CRL_set1_lastUpdate(crl, now)
    X509_CRL_set1_nextUpdate(crl, next)
    for serial in serials {
      let revoked = X509_REVOKED_new()
      let number = ASN1_INTEGER_new()
      ASN1_INTEGER_set(number, serial)
      X509_REVOKED_set_serialNumber(revoked, number)
      X509_REVOKED_set_revocationDate(revoked, now)
      ASN1_INTEGER_free(number)
      X509_CRL_add0_revoked(crl, revoked)
    }
    X509_CRL_sort(crl)
    guard X509_CRL_sign(crl, key, EVP_sha256()) > 0 else { throw HarnessError("X509_CRL_sign") }
    let bio = BIO_new(BIO_s_mem())
    defer { BIO_free(bio) }
    PEM_write_bio_X509_CRL(bio, crl)
    return TestCA.read(bio)
  }

  private func serial() -> Int {
    lock.lock()
    defer { lock.unlock() }
    nextSerial += 1
    return nextSerial
  }

  // MARK: - OpenSSL

  public static func generateKey(_ type: String = "EC") throws -> OpaquePointer {
    guard let ctx = EVP_PKEY_CTX_new_from_name(nil, type == "EC" ? "EC" : "RSA", "provider=default") else {
      throw HarnessError("EVP_PKEY_CTX_new_from_name")
    }
    defer { EVP_PKEY_CTX_free(ctx) }
    var key: OpaquePointer?
    guard EVP_PKEY_keygen_init(ctx) == 1 else { throw HarnessError("keygen init") }
    if type == "EC" {
      EVP_PKEY_CTX_set_group_name(ctx, "P-256")
    } else {
      EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 2048)
    }
    guard EVP_PKEY_generate(ctx, &key) == 1, let key else { throw HarnessError("keygen") }
    return key
  }

  static func makeCertificate(
    subject: String, publicKey: OpaquePointer, issuerName: String, issuerKey: OpaquePointer, serial: Int,
    isCA: Bool, notBefore: TimeInterval, notAfter: TimeInterval, extendedKeyUsage: String?,
    subjectAlternativeNames: [String]
  ) throws -> OpaquePointer {
    guard let x = X509_new() else { throw HarnessError("X509_new") }
    X509_set_version(x, 2)
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial)
    X509_gmtime_adj(X509_getm_notBefore(x), Int(notBefore))
    X509_gmtime_adj(X509_getm_notAfter(x), Int(notAfter))
    X509_set_pubkey(x, publicKey)
    X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_UTF8, subject, -1, -1, 0)
    X509_NAME_add_entry_by_txt(X509_get_issuer_name(x), "CN", MBSTRING_UTF8, issuerName, -1, -1, 0)
    var extensions: [(Int32, String)] = []
    if isCA {
      extensions += [(NID_basic_constraints, "critical,CA:TRUE"), (NID_key_usage, "critical,keyCertSign,cRLSign")]
    } else {
      extensions += [(NID_basic_constraints, "critical,CA:FALSE"), (NID_key_usage, "critical,digitalSignature")]
    }
    if let extendedKeyUsage { extensions.append((NID_ext_key_usage, extendedKeyUsage)) }
    if !subjectAlternativeNames.isEmpty {
      extensions.append((NID_subject_alt_name, subjectAlternativeNames.joined(separator: ",")))
    }
    for (nid, value) in extensions {
      guard let ext = X509V3_EXT_conf_nid(nil, nil, nid, value) else {
        X509_free(x)
        throw HarnessError("extension \(value)")
      }
      X509_add_ext(x, ext, -1)
      X509_EXTENSION_free(ext)
    }
    guard X509_sign(x, issuerKey, EVP_sha256()) > 0 else {
      X509_free(x)
      throw HarnessError("X509_sign")
    }
    return x
  }

  static func pem(_ x: OpaquePointer) -> String {
    let bio = BIO_new(BIO_s_mem())
    defer { BIO_free(bio) }
    PEM_write_bio_X509(bio, x)
    return read(bio)
  }

  public static func privateKeyPEM(_ key: OpaquePointer) -> String {
    let bio = BIO_new(BIO_s_mem())
    defer { BIO_free(bio) }
    PEM_write_bio_PrivateKey(bio, key, nil, nil, 0, nil, nil)
    return read(bio)
  }

  static func read(_ bio: OpaquePointer?) -> String {
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
      let n = BIO_read(bio, &chunk, Int32(chunk.count))
      if n <= 0 { break }
      bytes += chunk[0..<Int(n)]
    }
    return String(decoding: bytes, as: UTF8.self)
  }
}

/// `openssl s_server` as an independent TLS peer on a free loopback port, in `-www` mode: each
/// connection gets an HTTP page describing the session, including the client certificate the
/// server received. Stopped on `deinit`.
public final class OpenSSLServer: @unchecked Sendable {
  public let port: UInt16
  public let directory: URL
  private let process: ChildProcess

  /// - Parameters:
  ///   - extraArguments: e.g. `["-tls1_3"]`, `["-tls1_2"]`, `["-CRL", path, "-crl_check"]`.
  public init(
    certificatePEM: String, keyPEM: String, chainPEM: String? = nil, clientCAPEM: String,
    extraArguments: [String] = []
  ) throws {
    directory = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-s_server-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let cert = directory.appendingPathComponent("server.pem")
    let key = directory.appendingPathComponent("server.key")
    let ca = directory.appendingPathComponent("client-ca.pem")
    try certificatePEM.write(to: cert, atomically: true, encoding: .utf8)
    try keyPEM.write(to: key, atomically: true, encoding: .utf8)
    try clientCAPEM.write(to: ca, atomically: true, encoding: .utf8)
    var arguments = [
      "s_server", "-cert", cert.path, "-key", key.path, "-CAfile", ca.path, "-Verify", "4",
      "-verify_return_error", "-www", "-no_dhe",
    ]
    if let chainPEM {
      let chain = directory.appendingPathComponent("chain.pem")
      try chainPEM.write(to: chain, atomically: true, encoding: .utf8)
      arguments += ["-cert_chain", chain.path]
    }
    guard let openssl = findExecutable("openssl") else { throw HarnessError("openssl is not installed") }
    var lastLog = ""
    for _ in 0..<10 {
      let port = try PortFinder.free()
      let log = directory.appendingPathComponent("s_server.log")
      let p = try ChildProcess(
        openssl, arguments + ["-accept", "127.0.0.1:\(port)"] + extraArguments, logPath: log.path)
      let deadline = Date().addingTimeInterval(5)
      while p.isRunning && Date() < deadline {
        if PortFinder.waitUntilListening(port, timeout: 0.1) {
          self.port = port
          self.process = p
          return
        }
      }
      p.stop()
      lastLog = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
      // Only a port taken in the meantime is worth another try.
      if !lastLog.contains("in use") { break }
    }
    throw HarnessError("s_server did not start: \(lastLog)")
  }

  /// What s_server logged (verify errors, alerts).
  public var log: String {
    (try? String(contentsOf: directory.appendingPathComponent("s_server.log"), encoding: .utf8)) ?? ""
  }

  deinit {
    process.stop()
    try? FileManager.default.removeItem(at: directory)
  }
}
