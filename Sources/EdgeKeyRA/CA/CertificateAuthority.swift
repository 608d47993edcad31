internal import CEdgeKeyProvider
internal import COpenSSL
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

/// The CA a registration authority signs with: its certificate chain (issuing CA first) and
/// its private key, in a file or in the station's TPM.
public final class CertificateAuthority: @unchecked Sendable {
  // @unchecked: the key and certificates are never mutated after loading; signing with an
  // EVP_PKEY from several threads is safe in OpenSSL 3 (a TPM key serialises in its context).
  /// The CA's certificate followed by its issuers, up to (not including) the root.
  public let chain: [Certificate]
  private let key: OpaquePointer
  /// The TPM key behind `key`, when the CA key is held in a TPM.
  public let tpmKey: TPMKey?

  /// - Parameters:
  ///   - chainPEM: the issuing CA's certificate, then any CA above it.
  ///   - keyPEM: the issuing CA's private key (unencrypted PEM).
  public convenience init(chainPEM: String, keyPEM: String) throws(RAError) {
    let chain: [Certificate]
    do { chain = try Certificate.chain(pem: chainPEM) } catch { throw RAError("the CA certificate: \(error.reason)") }
    let bio = memoryBIO(Array(keyPEM.utf8))
    defer { BIO_free(bio) }
    guard let key = PEM_read_bio_PrivateKey(bio, nil, nil, nil) else {
      ERR_clear_error()
      throw RAError("the CA key is not an unencrypted PEM private key")
    }
    try self.init(chain: chain, key: key, tpmKey: nil)
  }

  /// A CA whose key is held in the station's TPM: it signs every certificate there, and the
  /// key cannot be copied off the station.
  public convenience init(chainPEM: String, key tpmKey: TPMKey) throws(RAError) {
    let chain: [Certificate]
    do { chain = try Certificate.chain(pem: chainPEM) } catch { throw RAError("the CA certificate: \(error.reason)") }
    guard let key = edgekey_evp_pkey(tpmKey.raw) else {
      throw RAError("the TPM key cannot be used through OpenSSL")
    }
    try self.init(chain: chain, key: key, tpmKey: tpmKey)
  }

  /// Takes `key` (freed on failure).
  private init(chain: [Certificate], key: OpaquePointer, tpmKey: TPMKey?) throws(RAError) {
    guard X509_check_private_key(chain[0].x509, key) == 1 else {
      ERR_clear_error()
      EVP_PKEY_free(key)
      throw RAError("the CA key does not belong to the CA certificate \(chain[0].subject)")
    }
    guard chain[0].isCA else {
      EVP_PKEY_free(key)
      throw RAError("\(chain[0].subject) is not a CA certificate")
    }
    self.chain = chain
    self.key = key
    self.tpmKey = tpmKey
  }

  deinit { EVP_PKEY_free(key) }

  /// The issuing CA's certificate.
  public var certificate: Certificate { chain[0] }

  /// SHA-384 for a P-384 (or larger) EC key, SHA-256 otherwise.
  private var digest: OpaquePointer? {
    EVP_PKEY_get_bits(key) >= 384 && EVP_PKEY_is_a(key, "EC") == 1 ? EVP_sha384() : EVP_sha256()
  }

  /// Signs a CRL with the CA key (in the TPM when it is held there).
  func sign(crl: OpaquePointer) -> Bool { X509_CRL_sign(crl, key, digest) > 0 }

  /// Signs a client certificate for the request's key and subject, with exactly the subject
  /// alternative names given (the policy's, never the request's own extension):
  /// digitalSignature, clientAuth, not a CA, with key identifiers and, when given, where the
  /// CRL is published. Valid from `now - backdate` until `lifetime` after `now`.
  public func issue(
    for csr: CertificateSigningRequest, subjectAlternativeNames: [SubjectAlternativeName] = [],
    lifetime: Duration, backdate: Duration = .zero, crlDistributionPoint: String? = nil
  ) throws(RAError) -> Certificate {
    let req: OpaquePointer
    do { req = try CertificateSigningRequest.parse(csr.der) } catch { throw RAError(error.reason) }
    defer { X509_REQ_free(req) }
    guard let publicKey = X509_REQ_get0_pubkey(req) else { throw RAError("the request's public key cannot be used") }
    var extensions: [(Int32, String)] = [
      (NID_basic_constraints, "critical,CA:FALSE"),
      (NID_key_usage, "critical,digitalSignature"),
      (NID_ext_key_usage, "clientAuth"),
    ]
    if let crlDistributionPoint { extensions.append((NID_crl_distribution_points, "URI:\(crlDistributionPoint)")) }
    return try sign(
      subject: X509_REQ_get_subject_name(req), publicKey: publicKey, extensions: extensions,
      subjectAlternativeNames: subjectAlternativeNames, lifetime: lifetime, backdate: backdate)
  }

  /// Signs an attestation key's certificate (TCG "TPM 2.0 Keys for Device Identity and
  /// Attestation": an AK certificate): subject CN = the device, extended key usage
  /// tcg-kp-AIKCertificate (2.23.133.8.3) only, so that it can never be a TLS client's, not a CA.
  /// Issued once credential activation proved the AK is in the device's TPM.
  public func issueAttestationKeyCertificate(
    publicKeySPKI: [UInt8], device: String, lifetime: Duration, backdate: Duration = .zero
  ) throws(RAError) -> Certificate {
    guard let key = CredentialProtection.parsePublicKey(publicKeySPKI) else {
      throw RAError("the attestation key is not a public key OpenSSL reads")
    }
    defer { EVP_PKEY_free(key) }
    guard let name = X509_NAME_new() else { throw RAError("out of memory") }
    defer { X509_NAME_free(name) }
    guard X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, device, -1, -1, 0) == 1 else {
      ERR_clear_error()
      throw RAError("the device id cannot be a common name")
    }
    return try sign(
      subject: name, publicKey: key,
      extensions: [
        (NID_basic_constraints, "critical,CA:FALSE"), (NID_key_usage, "critical,digitalSignature"),
        (NID_ext_key_usage, AttestationPolicy.attestationKeyUsage),
      ], subjectAlternativeNames: [], lifetime: lifetime, backdate: backdate)
  }

  /// A certificate for `publicKey` and `subject` with `extensions` (and the key identifiers),
  /// valid from `now - backdate` until `lifetime` after `now` (whole seconds), with a random serial.
  private func sign(
    subject: OpaquePointer?, publicKey: OpaquePointer, extensions: [(Int32, String)],
    subjectAlternativeNames: [SubjectAlternativeName], lifetime: Duration, backdate: Duration
  ) throws(RAError) -> Certificate {
    guard let x = X509_new() else { throw RAError("out of memory") }
    var owned: OpaquePointer? = x
    defer { if let owned { X509_free(owned) } }
    X509_set_version(x, 2)
    // 159 random bits: positive, unique, unpredictable (CA/Browser Forum asks for ≥ 64).
    let serial = BN_new()
    defer { BN_free(serial) }
    BN_rand(serial, 159, -1, 0)
    BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x))
    var now = time(nil)
    X509_time_adj_ex(X509_getm_notBefore(x), 0, -Int(backdate.components.seconds), &now)
    X509_time_adj_ex(X509_getm_notAfter(x), 0, Int(lifetime.components.seconds), &now)
    X509_set_subject_name(x, subject)
    X509_set_issuer_name(x, X509_get_subject_name(certificate.x509))
    guard X509_set_pubkey(x, publicKey) == 1 else { throw RAError("the public key cannot be used") }
    var v3 = X509V3_CTX()
    X509V3_set_ctx(&v3, certificate.x509, x, nil, nil, 0)
    var extensions = extensions + [(NID_subject_key_identifier, "hash")]
    // The authority key identifier needs the CA's own subject key identifier.
    if X509_get_ext_by_NID(certificate.x509, NID_subject_key_identifier, -1) >= 0 {
      extensions.append((NID_authority_key_identifier, "keyid"))
    }
    for (nid, value) in extensions {
      guard let ext = X509V3_EXT_conf_nid(nil, &v3, nid, value) else {
        ERR_clear_error()
        throw RAError("cannot make extension \(value)")
      }
      X509_add_ext(x, ext, -1)
      X509_EXTENSION_free(ext)
    }
    if !subjectAlternativeNames.isEmpty { try addSubjectAlternativeNames(subjectAlternativeNames, to: x) }
    guard X509_sign(x, key, digest) > 0 else {
      ERR_clear_error()
      throw RAError("signing the certificate failed")
    }
    owned = nil
    return Certificate(owning: x)
  }
}

/// The names built one by one (a2i_GENERAL_NAME takes a value as it is: a comma in it cannot
/// start another name, as it would in OpenSSL's configuration syntax).
private func addSubjectAlternativeNames(_ names: [SubjectAlternativeName], to x: OpaquePointer) throws(RAError) {
  guard let stack = OPENSSL_sk_new_null() else { throw RAError("out of memory") }
  defer { OPENSSL_sk_pop_free(stack, freeGeneralName) }
  for name in names {
    let type: Int32
    switch name {
    case .dns: type = GEN_DNS
    case .ip: type = GEN_IPADD
    case .uri: type = GEN_URI
    case .email: type = GEN_EMAIL
    }
    guard let general = a2i_GENERAL_NAME(nil, nil, nil, type, name.value, 0) else {
      ERR_clear_error()
      throw RAError("the subject alternative name \(name) cannot be encoded")
    }
    OPENSSL_sk_push(stack, general)
  }
  guard X509_add1_ext_i2d(x, NID_subject_alt_name, UnsafeMutableRawPointer(stack), 0, 0) == 1 else {
    ERR_clear_error()
    throw RAError("cannot add the subject alternative names")
  }
}

private let freeGeneralName: @convention(c) (UnsafeMutableRawPointer?) -> Void = {
  GENERAL_NAME_free($0?.assumingMemoryBound(to: GENERAL_NAME.self))
}

/// A registration authority's own failure (configuration, signing).
public struct RAError: Error, CustomStringConvertible, Sendable {
  public var description: String
  /// An error described by `description`.
  public init(_ description: String) { self.description = description }
}
