internal import COpenSSL
import EdgeKeyCore
import FoundationEssentials

/// An X.509 certificate, parsed by OpenSSL; everything a log, a store or a policy asks of it.
public final class Certificate: @unchecked Sendable, CustomStringConvertible {
  // @unchecked: the X509 is never mutated after parsing; OpenSSL's getters are thread-safe.
  package let x509: OpaquePointer

  /// Takes ownership of `x509`.
  package init(owning x509: OpaquePointer) { self.x509 = x509 }

  deinit { X509_free(x509) }

  /// Copies of the certificates in a `STACK_OF(X509)` (borrowed), in order.
  package static func copies(of stack: OpaquePointer) -> [Certificate] {
    (0..<OPENSSL_sk_num(stack)).compactMap { i in
      OPENSSL_sk_value(stack, i).flatMap { X509_dup(OpaquePointer($0)) }.map { Certificate(owning: $0) }
    }
  }

  /// Parses one DER certificate; trailing bytes are refused.
  public convenience init(der: [UInt8]) throws(TLSError) {
    let parsed = try parseDER(
      der, "certificate", code: .badCertificateChain, { d2i_X509(nil, $0, $1) }, free: X509_free)
    self.init(owning: parsed)
  }

  /// Parses the first PEM certificate in `pem`.
  public convenience init(pem: String) throws(TLSError) {
    let all = try Certificate.chain(pem: pem)
    self.init(owning: X509_dup(all[0].x509))
  }

  /// Every PEM certificate in `pem`, in order; throws when there is none or one is damaged.
  public static func chain(pem: String) throws(TLSError) -> [Certificate] {
    var result: [Certificate] = []
    // The error queue is read below to tell "no more certificates" from damage: an error left
    // by someone else (the TPM layer, another library) must not count.
    ERR_clear_error()
    let copy = memoryBIO(Array(pem.utf8))
    defer { BIO_free(copy) }
    while let x = PEM_read_bio_X509(copy, nil, nil, nil) {
      result.append(Certificate(owning: x))
    }
    let error = ERR_peek_last_error()
    ERR_clear_error()
    // "no start line" ends the loop normally; anything else is damage.
    let noStartLine = Int32(108)  // PEM_R_NO_START_LINE
    if error != 0 && ERR_GET_REASON_swift(error) != noStartLine {
      var text = [CChar](repeating: 0, count: 256)
      ERR_error_string_n(error, &text, text.count)
      let reason = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
      throw TLSError(.configuration, .badCertificateChain, "a PEM certificate is damaged (\(reason))")
    }
    if result.isEmpty && pem.contains("-----BEGIN CERTIFICATE-----") {
      throw TLSError(.configuration, .badCertificateChain, "a PEM certificate is damaged")
    }
    guard !result.isEmpty else { throw TLSError(.configuration, .badCertificateChain, "no PEM certificate") }
    return result
  }

  /// DER encoding.
  public var der: [UInt8] {
    var out: UnsafeMutablePointer<UInt8>?
    let n = i2d_X509(x509, &out)
    defer { CRYPTO_free(out, #file, #line) }
    guard n > 0, let out else { return [] }
    return Array(UnsafeBufferPointer(start: out, count: Int(n)))
  }

  /// PEM encoding.
  public var pem: String {
    let bio = BIO_new(BIO_s_mem())
    defer { BIO_free(bio) }
    PEM_write_bio_X509(bio, x509)
    return bioString(bio)
  }

  /// The subject as RFC 2253 text (`CN=device-1,O=Example`).
  public var subject: String { nameString(X509_get_subject_name(x509)) }
  /// The issuer as RFC 2253 text.
  public var issuer: String { nameString(X509_get_issuer_name(x509)) }
  /// The subject's relative distinguished names in order, as (short name, value): what a
  /// renewal request repeats.
  public var subjectFields: [(String, String)] { nameFields(X509_get_subject_name(x509)) }
  /// The subject's common name, if any.
  public var commonName: String? {
    let name = X509_get_subject_name(x509)
    let index = X509_NAME_get_index_by_NID(name, NID_commonName, -1)
    guard index >= 0, let entry = X509_NAME_get_entry(name, index),
      let data = X509_NAME_ENTRY_get_data(entry)
    else { return nil }
    return asn1String(data)
  }

  /// Serial number, upper-case hex.
  public var serialNumber: String {
    guard let bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x509), nil) else { return "" }
    defer { BN_free(bn) }
    guard let hex = BN_bn2hex(bn) else { return "" }
    defer { CRYPTO_free(hex, #file, #line) }
    return String(cString: hex)
  }

  /// Valid from.
  public var notBefore: Date { date(X509_get0_notBefore(x509)) }
  /// Valid until.
  public var notAfter: Date { date(X509_get0_notAfter(x509)) }

  /// True when `date` lies within the validity period.
  public func isValid(at date: Date = Date()) -> Bool { date >= notBefore && date <= notAfter }

  /// Subject alternative names.
  public var subjectAlternativeNames: [SubjectAlternativeName] {
    guard let raw = X509_get_ext_d2i(x509, NID_subject_alt_name, nil, nil) else { return [] }
    let names = OpaquePointer(raw)
    defer { GENERAL_NAMES_free(names) }
    return generalNames(names)
  }

  /// Extended key usages; empty when the extension is absent (which permits every usage).
  public var extendedKeyUsage: Set<ExtendedKeyUsage> {
    guard X509_get_extension_flags(x509) & UInt32(EXFLAG_XKUSAGE) != 0 else { return [] }
    let flags = X509_get_extended_key_usage(x509)
    var result: Set<ExtendedKeyUsage> = []
    if flags & UInt32(XKU_SSL_SERVER) != 0 { result.insert(.serverAuth) }
    if flags & UInt32(XKU_SSL_CLIENT) != 0 { result.insert(.clientAuth) }
    if flags & UInt32(XKU_CODE_SIGN) != 0 { result.insert(.codeSigning) }
    if flags & UInt32(XKU_SMIME) != 0 { result.insert(.emailProtection) }
    if flags & UInt32(XKU_ANYEKU) != 0 { result.insert(.any) }
    return result
  }

  /// The extended key usages as dotted OIDs, including ones OpenSSL has no flag for (the
  /// TCG's tcg-kp-AIKCertificate, 2.23.133.8.3); empty when the extension is absent.
  public var extendedKeyUsageOIDs: [String] {
    guard let raw = X509_get_ext_d2i(x509, NID_ext_key_usage, nil, nil) else { return [] }
    let stack = OpaquePointer(raw)
    defer { OPENSSL_sk_pop_free(stack, freeObject) }
    return (0..<OPENSSL_sk_num(stack)).compactMap { i -> String? in
      guard let object = OPENSSL_sk_value(stack, i) else { return nil }
      var text = [CChar](repeating: 0, count: 128)
      let n = OBJ_obj2txt(&text, Int32(text.count), OpaquePointer(object), 1)
      return n > 0 ? cString(text) : nil
    }
  }

  /// The directory-name attributes of the subject alternative names, as (dotted OID, value):
  /// where an EK certificate names its TPM (TCG EK Credential Profile: tcg-at-tpmManufacturer
  /// 2.23.133.2.1, tcg-at-tpmModel 2.23.133.2.2, tcg-at-tpmVersion 2.23.133.2.3).
  public var directoryNameAttributes: [(oid: String, value: String)] {
    guard let raw = X509_get_ext_d2i(x509, NID_subject_alt_name, nil, nil) else { return [] }
    let names = OpaquePointer(raw)
    defer { GENERAL_NAMES_free(names) }
    var result: [(String, String)] = []
    for i in 0..<OPENSSL_sk_num(names) {
      guard let element = OPENSSL_sk_value(names, i) else { continue }
      let name = element.assumingMemoryBound(to: GENERAL_NAME.self).pointee
      guard name.type == GEN_DIRNAME, let directory = name.d.directoryName else { continue }
      for j in 0..<X509_NAME_entry_count(directory) {
        guard let entry = X509_NAME_get_entry(directory, j) else { continue }
        var text = [CChar](repeating: 0, count: 128)
        guard OBJ_obj2txt(&text, Int32(text.count), X509_NAME_ENTRY_get_object(entry), 1) > 0 else { continue }
        result.append((cString(text), asn1String(X509_NAME_ENTRY_get_data(entry))))
      }
    }
    return result
  }

  /// True when the certificate may be used for TLS client authentication.
  public var allowsClientAuth: Bool {
    let eku = extendedKeyUsage
    return X509_get_extension_flags(x509) & UInt32(EXFLAG_XKUSAGE) == 0 || eku.contains(.clientAuth)
      || eku.contains(.any)
  }

  /// True for a CA certificate (basicConstraints cA).
  public var isCA: Bool { X509_check_ca(x509) > 0 }

  /// True when `issuer` names this certificate's issuer and its key verifies the signature.
  public func isIssued(by issuer: Certificate) -> Bool {
    defer { ERR_clear_error() }
    guard X509_check_issued(issuer.x509, x509) == X509_V_OK, let key = X509_get0_pubkey(issuer.x509) else {
      return false
    }
    return X509_verify(x509, key) == 1
  }

  /// A root: issued by itself (name and signature).
  public var isSelfSigned: Bool { isIssued(by: self) }

  /// The SubjectPublicKeyInfo, DER.
  public var publicKeyDER: [UInt8] { subjectPublicKeyInfo(X509_get0_pubkey(x509)) }

  /// "EC P-256", "RSA 2048", ...
  public var keyType: String {
    guard let key = X509_get0_pubkey(x509) else { return "unknown" }
    return describeKey(key)
  }

  /// SHA-256 of the DER certificate, lower-case hex (what `openssl x509 -fingerprint -sha256`
  /// prints, without the colons).
  public var fingerprint: String { Certificate.sha256Hex(der) }

  /// SHA-256 of `bytes`, lower-case hex.
  public static func sha256Hex(_ bytes: [UInt8]) -> String {
    var digest = [UInt8](repeating: 0, count: 32)
    var length: UInt32 = 32
    EVP_Digest(bytes, bytes.count, &digest, &length, EVP_sha256(), nil)
    return Text.hex(digest)
  }

  /// A summary for logs and errors.
  public var summary: TLSError.CertificateSummary {
    TLSError.CertificateSummary(
      subject: subject, issuer: issuer, notBefore: Certificate.format(notBefore),
      notAfter: Certificate.format(notAfter))
  }

  public var description: String { summary.description }

  /// A date as the summaries print it: UTC, ISO 8601, seconds.
  public static func format(_ date: Date) -> String {
    Timestamp.iso8601(date)
  }
}

extension Certificate {
  /// What a verified chain is for.
  public enum Purpose: Sendable {
    /// The extended key usage the leaf must allow.
    case clientAuth, serverAuth
    /// No purpose is checked (EK and AK certificates carry the TCG's own usages).
    case any
  }

  /// Verifies `leaf` up to one of `anchors`, with `untrusted` as candidate intermediates, at
  /// `date`, for `purpose`. Returns the chain leaf first, without the anchor (what a TLS peer
  /// sends); throws with OpenSSL's reason otherwise.
  ///
  /// `partialChain`: an anchor may be an intermediate (a TPM maker's issuing CA configured
  /// without its root).
  public static func verifiedChain(
    leaf: Certificate, untrusted: [Certificate], anchors: [Certificate], purpose: Purpose, at date: Date = Date(),
    partialChain: Bool = false
  ) throws(TLSError) -> [Certificate] {
    guard let store = X509_STORE_new(), let context = X509_STORE_CTX_new() else {
      throw TLSError(.tls, .other, "out of memory")
    }
    defer {
      X509_STORE_CTX_free(context)
      X509_STORE_free(store)
    }
    for anchor in anchors { X509_STORE_add_cert(store, anchor.x509) }
    let intermediates = OPENSSL_sk_new_null()
    defer { OPENSSL_sk_free(intermediates) }
    for c in untrusted { OPENSSL_sk_push(intermediates, UnsafeRawPointer(c.x509)) }
    guard X509_STORE_CTX_init(context, store, leaf.x509, intermediates) == 1 else {
      ERR_clear_error()
      throw TLSError(.tls, .other, "cannot set up chain verification")
    }
    switch purpose {
    case .clientAuth: X509_STORE_CTX_set_purpose(context, X509_PURPOSE_SSL_CLIENT)
    case .serverAuth: X509_STORE_CTX_set_purpose(context, X509_PURPOSE_SSL_SERVER)
    case .any: break
    }
    X509_VERIFY_PARAM_set_time(X509_STORE_CTX_get0_param(context), time_t(date.timeIntervalSince1970))
    if partialChain { X509_VERIFY_PARAM_set_flags(X509_STORE_CTX_get0_param(context), UInt(X509_V_FLAG_PARTIAL_CHAIN)) }
    guard X509_verify_cert(context) == 1 else {
      let code = X509_STORE_CTX_get_error(context)
      let depth = X509_STORE_CTX_get_error_depth(context)
      let at = X509_STORE_CTX_get_current_cert(context).map { nameString(X509_get_subject_name($0)) } ?? leaf.subject
      ERR_clear_error()
      throw TLSError(
        .serverCertificate, TLSError.serverCode(Int(code)),
        "\(String(cString: X509_verify_cert_error_string(Int(code)))) (at \(at), depth \(depth))",
        certificate: leaf.summary)
    }
    guard let chain = X509_STORE_CTX_get0_chain(context) else { return [leaf] }
    var result = copies(of: chain)
    // The anchor stays with the trust store, not in the chain we present.
    if result.count > 1, let last = result.last, anchors.contains(where: { $0.der == last.der }) {
      result.removeLast()
    }
    return result
  }
}

/// A subject alternative name.
public enum SubjectAlternativeName: Hashable, Sendable, CustomStringConvertible {
  /// A DNS name.
  case dns(String)
  /// An IPv4 or IPv6 address, as text.
  case ip(String)
  /// A URI.
  case uri(String)
  /// An e-mail address.
  case email(String)

  public var description: String {
    switch self {
    case .dns(let v): return "DNS:\(v)"
    case .ip(let v): return "IP:\(v)"
    case .uri(let v): return "URI:\(v)"
    case .email(let v): return "email:\(v)"
    }
  }
}

/// Extended key usages EdgeKey cares about.
public enum ExtendedKeyUsage: String, Hashable, Sendable {
  /// RFC 5280's key purposes, and anyExtendedKeyUsage.
  case serverAuth, clientAuth, codeSigning, emailProtection, any
}

// MARK: - OpenSSL helpers

/// Runs an OpenSSL `d2i_*` over all of `der`: a failure, or bytes left after the object, is
/// "not a DER <what>" or "<n> bytes after the <what>" (the object is then freed with `free`).
func parseDER<T>(
  _ der: [UInt8], _ what: String, code: TLSError.Code,
  _ d2i: (UnsafeMutablePointer<UnsafePointer<UInt8>?>, Int) -> T?, free: (T) -> Void
) throws(TLSError) -> T {
  var parsed: T?
  let consumed = der.withUnsafeBufferPointer { buffer -> Int in
    var p: UnsafePointer<UInt8>? = buffer.baseAddress
    parsed = d2i(&p, buffer.count)
    guard let p, let base = buffer.baseAddress else { return -1 }
    return p - base
  }
  ERR_clear_error()
  guard let parsed else { throw TLSError(.configuration, code, "not a DER \(what)") }
  guard consumed == der.count else {
    free(parsed)
    throw TLSError(.configuration, code, "\(der.count - consumed) bytes after the \(what)")
  }
  return parsed
}

private let freeObject: @convention(c) (UnsafeMutableRawPointer?) -> Void = { ASN1_OBJECT_free(OpaquePointer($0)) }

/// "EC P-256", "RSA 2048", ... for an EVP_PKEY.
func describeKey(_ key: OpaquePointer) -> String {
  let bits = EVP_PKEY_get_bits(key)
  if EVP_PKEY_is_a(key, "EC") == 1 {
    var group = [CChar](repeating: 0, count: 64)
    var length = 0
    if EVP_PKEY_get_group_name(key, &group, group.count, &length) == 1 {
      let name = cString(group)
      switch name {
      case "prime256v1": return "EC P-256"
      case "secp384r1": return "EC P-384"
      case "secp521r1": return "EC P-521"
      default: return "EC \(name)"
      }
    }
    return "EC \(bits)"
  }
  if EVP_PKEY_is_a(key, "RSA") == 1 { return "RSA \(bits)" }
  return String(cString: EVP_PKEY_get0_type_name(key))
}

/// The names of a GENERAL_NAMES stack that EdgeKey understands.
func generalNames(_ names: OpaquePointer) -> [SubjectAlternativeName] {
  var result: [SubjectAlternativeName] = []
  for i in 0..<OPENSSL_sk_num(names) {
    guard let element = OPENSSL_sk_value(names, i) else { continue }
    let name = element.assumingMemoryBound(to: GENERAL_NAME.self).pointee
    switch name.type {
    case GEN_DNS: result.append(.dns(asn1String(name.d.dNSName)))
    case GEN_URI: result.append(.uri(asn1String(name.d.uniformResourceIdentifier)))
    case GEN_EMAIL: result.append(.email(asn1String(name.d.rfc822Name)))
    case GEN_IPADD: result.append(.ip(ipText(asn1Bytes(name.d.iPAddress))))
    default: continue
    }
  }
  return result
}

// ERR_GET_REASON is a static inline function in OpenSSL 3; Swift does not always import it.
func ERR_GET_REASON_swift(_ e: UInt) -> Int32 { Int32(e & 0x7FFFFF) }

func bioString(_ bio: OpaquePointer?) -> String {
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 4096)
  while true {
    let n = BIO_read(bio, &chunk, Int32(chunk.count))
    if n <= 0 { break }
    bytes += chunk[0..<Int(n)]
  }
  return String(decoding: bytes, as: UTF8.self)
}

/// A key's SubjectPublicKeyInfo, DER (empty without a key).
func subjectPublicKeyInfo(_ key: OpaquePointer?) -> [UInt8] {
  guard let key else { return [] }
  var out: UnsafeMutablePointer<UInt8>?
  let n = i2d_PUBKEY(key, &out)
  defer { CRYPTO_free(out, #file, #line) }
  guard n > 0, let out else { return [] }
  return Array(UnsafeBufferPointer(start: out, count: Int(n)))
}

/// A memory BIO holding a copy of `bytes`. (BIO_new_mem_buf does not copy, and an optimised
/// build may free a Swift array right after its last use: reading such a BIO later read freed
/// memory, "bad end line" in release builds.)
package func memoryBIO(_ bytes: [UInt8]) -> OpaquePointer? {
  guard let bio = BIO_new(BIO_s_mem()) else { return nil }
  let written = bytes.withUnsafeBufferPointer { BIO_write(bio, $0.baseAddress, Int32($0.count)) }
  guard bytes.isEmpty || written == Int32(bytes.count) else {
    BIO_free(bio)
    return nil
  }
  return bio
}

/// A name's relative distinguished names in order, as (short name, value).
func nameFields(_ name: OpaquePointer?) -> [(String, String)] {
  (0..<X509_NAME_entry_count(name)).compactMap { i -> (String, String)? in
    guard let entry = X509_NAME_get_entry(name, i),
      let short = OBJ_nid2sn(OBJ_obj2nid(X509_NAME_ENTRY_get_object(entry)))
    else { return nil }
    return (String(cString: short), asn1String(X509_NAME_ENTRY_get_data(entry)))
  }
}

func nameString(_ name: OpaquePointer?) -> String {
  let bio = BIO_new(BIO_s_mem())
  defer { BIO_free(bio) }
  // XN_FLAG_RFC2253 without ASN1_STRFLGS_ESC_MSB, so UTF-8 stays readable (the macro is
  // computed, so Swift does not import it).
  let rfc2253Readable: UInt = 0x111_0313
  X509_NAME_print_ex(bio, name, 0, rfc2253Readable)
  return bioString(bio)
}

func asn1Bytes(_ s: UnsafePointer<ASN1_STRING>?) -> [UInt8] {
  guard let s, let data = ASN1_STRING_get0_data(s) else { return [] }
  return Array(UnsafeBufferPointer(start: data, count: Int(ASN1_STRING_length(s))))
}

func asn1String(_ s: UnsafePointer<ASN1_STRING>?) -> String { String(decoding: asn1Bytes(s), as: UTF8.self) }

func ipText(_ bytes: [UInt8]) -> String {
  if bytes.count == 4 { return bytes.map(String.init).joined(separator: ".") }
  if bytes.count == 16 {
    var buffer = [CChar](repeating: 0, count: 64)
    var addr = in6_addr()
    withUnsafeMutableBytes(of: &addr) { $0.copyBytes(from: bytes) }
    inet_ntop(AF_INET6, &addr, &buffer, socklen_t(buffer.count))
    return cString(buffer)
  }
  return Text.hex(bytes)
}

func date(_ t: UnsafePointer<ASN1_TIME>?) -> Date {
  var tm = tm()
  guard let t, ASN1_TIME_to_tm(t, &tm) == 1 else { return Date(timeIntervalSince1970: 0) }
  return Date(timeIntervalSince1970: TimeInterval(timegm(&tm)))
}

/// A NUL-terminated C buffer as a String.
func cString(_ buffer: [CChar]) -> String {
  String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
