internal import CEdgeKeyProvider
internal import COpenSSL
import EdgeKeyCore
import EdgeKeyTPM

/// A PKCS#10 certificate signing request, signed inside the TPM by the key it is for.
public struct CertificateSigningRequest: Sendable {
  /// DER encoding (what EST's simpleenroll carries, base64-encoded).
  public let der: [UInt8]

  /// PEM encoding (`-----BEGIN CERTIFICATE REQUEST-----`).
  public var pem: String { PEM.encode(der, label: "CERTIFICATE REQUEST") }

  /// Builds and signs a request.
  ///
  /// - Parameters:
  ///   - subject: relative distinguished names in order, e.g. `[("O", "Acme"), ("CN", "dev-1")]`.
  ///   - subjectAlternativeNames: DNS names, IP addresses, URIs, e-mail addresses.
  ///   - requestClientAuth: ask for the clientAuth extended key usage (and digitalSignature).
  ///   - challengePassword: the PKCS#9 challengePassword attribute (EST servers use it for
  ///     one-time enrollment secrets).
  ///   - signatureHash: the digest the request is signed with; nil: the key's own (SHA-384
  ///     for P-384, else SHA-256). An EST server may ask for one in csrattrs.
  ///   - attestation: evidence that `key` is inside this TPM (TPM2_Certify by an attestation
  ///     key), carried as the id-aa-attestation attribute.
  public init(
    key: TPMKey, subject: [(String, String)], subjectAlternativeNames: [SubjectAlternativeName] = [],
    requestClientAuth: Bool = true, challengePassword: String? = nil, signatureHash: HashAlgorithm? = nil,
    attestation: KeyAttestation? = nil
  ) throws(TLSError) {
    guard let pkey = edgekey_evp_pkey(key.raw) else {
      throw TLSError(.configuration, .unusableKey, "the TPM key cannot be used through OpenSSL")
    }
    defer { EVP_PKEY_free(pkey) }
    guard let req = X509_REQ_new() else { throw TLSError(.tls, .other, "out of memory") }
    defer { X509_REQ_free(req) }
    X509_REQ_set_version(req, 0)
    let name = X509_REQ_get_subject_name(req)
    for (field, value) in subject {
      let ok = X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8, value, -1, -1, 0)
      guard ok == 1 else {
        ERR_clear_error()
        throw TLSError(.configuration, .other, "subject field \(field)=\(value) is not valid")
      }
    }
    X509_REQ_set_pubkey(req, pkey)

    var extensions: [OpaquePointer] = []
    defer { extensions.forEach { X509_EXTENSION_free($0) } }
    func addExtension(_ nid: Int32, _ value: String) throws(TLSError) {
      guard let ext = X509V3_EXT_conf_nid(nil, nil, nid, value) else {
        ERR_clear_error()
        throw TLSError(.configuration, .other, "extension value \(value) is not valid")
      }
      extensions.append(ext)
    }
    if !subjectAlternativeNames.isEmpty {
      for san in subjectAlternativeNames where san.value.contains(",") || san.value.contains(where: \.isNewline) {
        throw TLSError(.configuration, .other, "subject alternative name \(san) contains a comma or newline")
      }
      try addExtension(NID_subject_alt_name, subjectAlternativeNames.map(\.opensslText).joined(separator: ","))
    }
    if requestClientAuth {
      try addExtension(NID_key_usage, "critical,digitalSignature")
      try addExtension(NID_ext_key_usage, "clientAuth")
    }
    if !extensions.isEmpty {
      let stack = OPENSSL_sk_new_null()
      defer { OPENSSL_sk_free(stack) }
      for ext in extensions { OPENSSL_sk_push(stack, UnsafeRawPointer(ext)) }
      guard X509_REQ_add_extensions(req, stack) == 1 else {
        throw TLSError(.tls, .other, "cannot add extensions to the request")
      }
    }
    if let challengePassword {
      guard
        X509_REQ_add1_attr_by_NID(req, NID_pkcs9_challengePassword, MBSTRING_UTF8, challengePassword, -1) == 1
      else {
        ERR_clear_error()
        throw TLSError(.configuration, .other, "the challenge password is not valid")
      }
    }
    if let attestation {
      let bundle = attestation.der
      let added = bundle.withUnsafeBufferPointer {
        X509_REQ_add1_attr_by_txt(req, KeyAttestation.attributeOID, V_ASN1_SEQUENCE, $0.baseAddress, Int32($0.count))
      }
      guard added == 1 else {
        ERR_clear_error()
        throw TLSError(.tls, .other, "cannot add the key attestation to the request")
      }
    }
    let digest: OpaquePointer? =
      switch signatureHash ?? (key.algorithm == .eccP384 ? .sha384 : .sha256) {
      case .sha1: EVP_sha1()
      case .sha256: EVP_sha256()
      case .sha384: EVP_sha384()
      case .sha512: EVP_sha512()
      }
    ERR_clear_error()
    guard X509_REQ_sign(req, pkey, digest) > 0 else {
      var failure = edgekey_tls_failure()
      edgekey_tls_diagnose(nil, 0, &failure)
      let error = TLSError(failure: failure)
      throw error.layer == .tpm ? error : TLSError(.tls, .other, "signing the request failed: \(error.reason)")
    }
    var out: UnsafeMutablePointer<UInt8>?
    let n = i2d_X509_REQ(req, &out)
    defer { CRYPTO_free(out, #file, #line) }
    guard n > 0, let out else { throw TLSError(.tls, .other, "cannot encode the request") }
    der = Array(UnsafeBufferPointer(start: out, count: Int(n)))
  }
}

/// One attribute of a subject as encoded: its short name ("CN", "O", "unknown"), the ASN.1
/// string type (`V_ASN1_UTF8STRING`, ...), the bytes, and which RDN it is in (two entries in one
/// RDN share `set`).
package struct SubjectEntry: Sendable, Equatable {
  package var field: String
  package var stringType: Int32
  package var bytes: [UInt8]
  package var set: Int32

  /// The value as text, when the encoding is one a new certificate may use (RFC 5280 §4.1.2.6:
  /// PrintableString or UTF8String) and the bytes are valid for it.
  package var text: String? {
    switch stringType {
    case V_ASN1_UTF8STRING: return String(validating: bytes, as: UTF8.self)
    case V_ASN1_PRINTABLESTRING:
      return bytes.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) ? String(decoding: bytes, as: UTF8.self) : nil
    default: return nil
    }
  }
}

extension SubjectAlternativeName {
  package var value: String {
    switch self {
    case .dns(let v), .ip(let v), .uri(let v), .email(let v): return v
    }
  }
  /// The form of OpenSSL's extension configuration language.
  var opensslText: String {
    switch self {
    case .dns(let v): return "DNS:\(v)"
    case .ip(let v): return "IP:\(v)"
    case .uri(let v): return "URI:\(v)"
    case .email(let v): return "email:\(v)"
    }
  }
}

extension CertificateSigningRequest {
  /// Parses a DER request (the registration authority's side) and checks its signature.
  public init(der: [UInt8]) throws(TLSError) {
    let req = try CertificateSigningRequest.parse(der)
    defer { X509_REQ_free(req) }
    guard let key = X509_REQ_get0_pubkey(req), X509_REQ_verify(req, key) == 1 else {
      ERR_clear_error()
      throw TLSError(.configuration, .other, "the request's signature does not verify")
    }
    self.der = der
  }

  package static func parse(_ der: [UInt8]) throws(TLSError) -> OpaquePointer {
    try parseDER(der, "PKCS#10 request", code: .other, { d2i_X509_REQ(nil, $0, $1) }, free: X509_REQ_free)
  }

  private func withRequest<R>(_ body: (OpaquePointer) -> R) -> R {
    // `der` was produced or verified by an initializer, so it parses.
    let req = try! CertificateSigningRequest.parse(der)
    defer { X509_REQ_free(req) }
    return body(req)
  }

  /// The subject as RFC 2253 text, as `Certificate.subject` prints it.
  public var subject: String { withRequest { nameString(X509_REQ_get_subject_name($0)) } }

  /// The subject's relative distinguished names in order, as (short name, value).
  public var subjectFields: [(String, String)] {
    withRequest { nameFields(X509_REQ_get_subject_name($0)) }
  }

  /// The subject's attributes as they are encoded, for a registration authority that must
  /// judge the bytes (a name policy), not their readable rendering.
  package var subjectEntries: [SubjectEntry] {
    withRequest { req in
      let name = X509_REQ_get_subject_name(req)
      return (0..<X509_NAME_entry_count(name)).compactMap { i -> SubjectEntry? in
        guard let entry = X509_NAME_get_entry(name, i) else { return nil }
        let nid = OBJ_obj2nid(X509_NAME_ENTRY_get_object(entry))
        let field = nid == NID_undef ? "unknown" : String(cString: OBJ_nid2sn(nid))
        let data = X509_NAME_ENTRY_get_data(entry)
        return SubjectEntry(
          field: field, stringType: data.map { ASN1_STRING_type($0) } ?? -1, bytes: asn1Bytes(data),
          set: X509_NAME_ENTRY_set(entry))
      }
    }
  }

  /// The requested key, SubjectPublicKeyInfo DER.
  public var publicKeyDER: [UInt8] {
    withRequest { subjectPublicKeyInfo(X509_REQ_get0_pubkey($0)) }
  }

  /// The requested key's type and size: "EC P-256", "RSA 2048", ...
  public var keyType: String {
    withRequest { req in
      guard let key = X509_REQ_get0_pubkey(req) else { return "unknown" }
      return describeKey(key)
    }
  }

  /// The subject alternative names asked for in the extension request.
  public var subjectAlternativeNames: [SubjectAlternativeName] {
    withRequest { req in
      guard let extensions = X509_REQ_get_extensions(req) else { return [] }
      defer { OPENSSL_sk_pop_free(extensions, edgekeyFreeExtension) }
      let index = X509v3_get_ext_by_NID(extensions, NID_subject_alt_name, -1)
      guard index >= 0, let ext = X509v3_get_ext(extensions, index),
        let raw = X509V3_EXT_d2i(ext)
      else { return [] }
      let names = OpaquePointer(raw)
      defer { GENERAL_NAMES_free(names) }
      return generalNames(names)
    }
  }

  /// The key attestation (id-aa-attestation), nil when the request has none. Throws for a
  /// request with more than one such attribute, one with other than exactly one value, or a
  /// bundle that cannot be read (draft-ietf-lamps-csr-attestation §4.3).
  public func keyAttestation() throws(TLSError) -> KeyAttestation? {
    let found: Result<[UInt8]?, TLSError> = withRequest { req in
      guard let object = OBJ_txt2obj(KeyAttestation.attributeOID, 1) else { return .success(nil) }
      defer { ASN1_OBJECT_free(object) }
      let index = X509_REQ_get_attr_by_OBJ(req, object, -1)
      guard index >= 0 else { return .success(nil) }
      if X509_REQ_get_attr_by_OBJ(req, object, index) >= 0 {
        return .failure(TLSError(.configuration, .other, "the request has more than one id-aa-attestation attribute"))
      }
      guard let attribute = X509_REQ_get_attr(req, index), X509_ATTRIBUTE_count(attribute) == 1,
        let type = X509_ATTRIBUTE_get0_type(attribute, 0), type.pointee.type == V_ASN1_SEQUENCE
      else {
        return .failure(TLSError(.configuration, .other, "id-aa-attestation must hold exactly one AttestationBundle"))
      }
      return .success(asn1Bytes(type.pointee.value.sequence))
    }
    guard let bundle = try found.get() else { return nil }
    return try KeyAttestation(bundle: bundle)
  }

  /// The challengePassword attribute, if any.
  public var challengePassword: String? {
    withRequest { req in
      let index = X509_REQ_get_attr_by_NID(req, NID_pkcs9_challengePassword, -1)
      guard index >= 0, let attribute = X509_REQ_get_attr(req, index),
        let type = X509_ATTRIBUTE_get0_type(attribute, 0)
      else { return nil }
      switch type.pointee.type {
      case V_ASN1_UTF8STRING, V_ASN1_PRINTABLESTRING, V_ASN1_IA5STRING, V_ASN1_T61STRING, V_ASN1_BMPSTRING:
        return asn1String(type.pointee.value.asn1_string)
      default: return nil
      }
    }
  }
}

private let edgekeyFreeExtension: @convention(c) (UnsafeMutableRawPointer?) -> Void = {
  X509_EXTENSION_free(OpaquePointer($0))
}
