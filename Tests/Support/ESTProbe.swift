import COpenSSL
import EdgeKeyCore
import Foundation

/// An EST client that is not ours: requests built byte by byte with OpenSSL (any subject, any
/// string type, any SAN) from software keys, sent with curl. For testing what the RA refuses.
public final class ESTProbe: @unchecked Sendable {
  public let ra: RegistrationAuthority
  private let directory: URL
  private let caFile: String

  public init(_ ra: RegistrationAuthority) throws {
    self.ra = ra
    directory = ra.directory.appendingPathComponent("probe-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    caFile = directory.appendingPathComponent("ca.pem").path
    try ra.ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
  }

  /// A software P-256 key, as PEM (a device's key would be in its TPM; the RA cannot tell).
  public struct Key: Sendable {
    public let pem: String
    public let file: String
  }

  public func newKey() throws -> Key {
    let key = try TestCA.generateKey()
    defer { EVP_PKEY_free(key) }
    let pem = TestCA.privateKeyPEM(key)
    let file = directory.appendingPathComponent("key-\(UUID().uuidString).pem").path
    try pem.write(toFile: file, atomically: true, encoding: .utf8)
    return Key(pem: pem, file: file)
  }

  /// A subject attribute: its field, the bytes and the ASN.1 string type (UTF8String by default).
  public struct Attribute: Sendable {
    public var field: String
    public var bytes: [UInt8]
    public var type: Int32
    public init(_ field: String, _ value: String, type: Int32 = V_ASN1_UTF8STRING) {
      self.init(field, bytes: Array(value.utf8), type: type)
    }
    public init(_ field: String, bytes: [UInt8], type: Int32 = V_ASN1_UTF8STRING) {
      self.field = field
      self.bytes = bytes
      self.type = type
    }
  }

  /// A DER PKCS#10 request signed by `key`, with exactly these attributes and SANs (OpenSSL's
  /// "DNS:x,IP:y" syntax).
  public func request(key: Key, subject: [Attribute], sans: String? = nil, challengePassword: String? = nil) throws
    -> [UInt8]
  {
    try Self.request(keyPEM: key.pem, subject: subject, sans: sans, challengePassword: challengePassword)
  }

  /// The same, from a PEM key, without an RA.
  public static func request(
    keyPEM: String, subject: [Attribute], sans: String? = nil, challengePassword: String? = nil
  ) throws -> [UInt8] {
    let bio = BIO_new(BIO_s_mem())
    defer { BIO_free(bio) }
    _ = keyPEM.withCString { BIO_puts(bio, $0) }
    guard let pkey = PEM_read_bio_PrivateKey(bio, nil, nil, nil) else { throw HarnessError("key") }
    defer { EVP_PKEY_free(pkey) }
    guard let req = X509_REQ_new() else { throw HarnessError("X509_REQ_new") }
    defer { X509_REQ_free(req) }
    X509_REQ_set_version(req, 0)
    let name = X509_REQ_get_subject_name(req)
    for a in subject {
      guard X509_NAME_add_entry_by_txt(name, a.field, a.type, a.bytes, Int32(a.bytes.count), -1, 0) == 1 else {
        ERR_clear_error()
        throw HarnessError("subject attribute \(a.field)")
      }
    }
    X509_REQ_set_pubkey(req, pkey)
    if let sans {
      let extensions = OPENSSL_sk_new_null()
      defer { OPENSSL_sk_pop_free(extensions, freeExtension) }
      guard let ext = X509V3_EXT_conf_nid(nil, nil, NID_subject_alt_name, sans) else {
        ERR_clear_error()
        throw HarnessError("SAN \(sans)")
      }
      OPENSSL_sk_push(extensions, UnsafeRawPointer(ext))
      X509_REQ_add_extensions(req, extensions)
    }
    if let challengePassword {
      X509_REQ_add1_attr_by_NID(req, NID_pkcs9_challengePassword, MBSTRING_UTF8, challengePassword, -1)
    }
    guard X509_REQ_sign(req, pkey, EVP_sha256()) > 0 else {
      let e = ERR_get_error()
      ERR_clear_error()
      throw HarnessError(
        "X509_REQ_sign (\(subject.map(\.field))): \(ERR_reason_error_string(e).map { String(cString: $0) } ?? "?")")
    }
    var out: UnsafeMutablePointer<UInt8>?
    let n = i2d_X509_REQ(req, &out)
    defer { CRYPTO_free(out, #file, #line) }
    return Array(UnsafeBufferPointer(start: out, count: Int(n)))
  }

  /// What the RA answered.
  public struct Answer: Sendable {
    public var status: Int
    public var headers: [String: String]
    public var body: String
    /// The issued certificate (PEM), on a 200.
    public var certificatePEM: String?
  }

  /// POSTs `csr` to simpleenroll (or simplereenroll) with HTTP Basic `user:password` and/or a
  /// client certificate (PEM chain file and key file).
  public func enroll(
    _ csr: [UInt8], basic: String? = nil, clientCertificate: (chain: String, key: String)? = nil,
    renewal: Bool = false, source: String? = nil
  ) throws -> Answer {
    let body = directory.appendingPathComponent("csr-\(UUID().uuidString).b64").path
    try Base64.encodeLines(csr).write(toFile: body, atomically: true, encoding: .utf8)
    let headers = directory.appendingPathComponent("headers-\(UUID().uuidString)").path
    let output = directory.appendingPathComponent("body-\(UUID().uuidString)").path
    var arguments = [
      "-s", "-o", output, "-D", headers, "--cacert", caFile, "-H", "Content-Type: application/pkcs10",
      "--data-binary", "@\(body)",
    ]
    // The password from a file curl reads, never an argument.
    if let basic {
      let netrc = directory.appendingPathComponent("auth-\(UUID().uuidString)").path
      try "user = \"\(basic)\"\n".write(toFile: netrc, atomically: true, encoding: .utf8)
      arguments += ["-K", netrc]
    }
    if let clientCertificate { arguments += ["--cert", clientCertificate.chain, "--key", clientCertificate.key] }
    if let source { arguments += ["--interface", source] }
    arguments.append("\(ra.localhostURL)/.well-known/est/\(renewal ? "simplereenroll" : "simpleenroll")")
    let result = try Command.runCapturing("curl", arguments)
    guard result.status == 0 else { throw HarnessError("curl: \(result.status) \(result.stderr)") }
    let head = (try? String(contentsOfFile: headers, encoding: .utf8)) ?? ""
    let lines = head.components(separatedBy: "\r\n")
    let status = Int(lines.first?.split(separator: " ").dropFirst().first ?? "") ?? 0
    var fields: [String: String] = [:]
    for line in lines.dropFirst() {
      guard let colon = line.firstIndex(of: ":") else { continue }
      fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
    let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
    var pem: String?
    if status == 200 {
      let der = Base64.decode(text.filter { !$0.isWhitespace }) ?? []
      pem = try Self.firstCertificate(pkcs7: der)
    }
    return Answer(status: status, headers: fields, body: text, certificatePEM: pem)
  }

  /// Writes `pem` to a file in the probe's directory and returns its path.
  public func file(_ pem: String) throws -> String {
    let path = directory.appendingPathComponent("file-\(UUID().uuidString).pem").path
    try pem.write(toFile: path, atomically: true, encoding: .utf8)
    return path
  }

  public static func firstCertificate(pkcs7 der: [UInt8]) throws -> String? {
    try der.withUnsafeBufferPointer { buffer -> String? in
      var p = buffer.baseAddress
      guard let p7 = d2i_PKCS7(nil, &p, buffer.count) else { throw HarnessError("not PKCS#7") }
      defer { PKCS7_free(p7) }
      guard let certs = p7.pointee.d.sign.pointee.cert, OPENSSL_sk_num(certs) > 0,
        let first = OPENSSL_sk_value(certs, 0)
      else { return nil }
      return TestCA.pem(OpaquePointer(first))
    }
  }
}

private let freeExtension: @convention(c) (UnsafeMutableRawPointer?) -> Void = {
  X509_EXTENSION_free(OpaquePointer($0))
}
