import CEdgeKeyProvider
import COpenSSL
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

/// The CA a registration authority signs with: its certificate chain (issuing CA first) and
/// its private key, in a file or in the station's TPM.
public final class CertificateAuthority: @unchecked Sendable {
  // @unchecked: the key and certificates are never mutated after loading; signing with an
  // EVP_PKEY from several threads is safe in OpenSSL 3 (a TPM key serialises in its context).
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

  /// Signs a client certificate for the request's key, subject and subject alternative names:
  /// digitalSignature, clientAuth, not a CA, with key identifiers. Valid from `now - backdate`
  /// for `lifetime` seconds after `now`.
  public func issue(for csr: CertificateSigningRequest, lifetime: TimeInterval, backdate: TimeInterval = 0)
    throws(RAError) -> Certificate
  {
    let req: OpaquePointer
    do { req = try CertificateSigningRequest.parse(csr.der) } catch { throw RAError(error.reason) }
    defer { X509_REQ_free(req) }
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
    X509_time_adj_ex(X509_getm_notBefore(x), 0, -Int(backdate), &now)
    X509_time_adj_ex(X509_getm_notAfter(x), 0, Int(lifetime), &now)
    X509_set_subject_name(x, X509_REQ_get_subject_name(req))
    X509_set_issuer_name(x, X509_get_subject_name(certificate.x509))
    guard let publicKey = X509_REQ_get0_pubkey(req), X509_set_pubkey(x, publicKey) == 1 else {
      throw RAError("the request's public key cannot be used")
    }
    var v3 = X509V3_CTX()
    X509V3_set_ctx(&v3, certificate.x509, x, nil, nil, 0)
    var extensions: [(Int32, String)] = [
      (NID_basic_constraints, "critical,CA:FALSE"),
      (NID_key_usage, "critical,digitalSignature"),
      (NID_ext_key_usage, "clientAuth"),
      (NID_subject_key_identifier, "hash"),
    ]
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
    // The subject alternative names asked for, copied as they are.
    if let requested = X509_REQ_get_extensions(req) {
      defer { OPENSSL_sk_pop_free(requested, freeExtension) }
      let index = X509v3_get_ext_by_NID(requested, NID_subject_alt_name, -1)
      if index >= 0, let san = X509v3_get_ext(requested, index) {
        X509_add_ext(x, san, -1)
      }
    }
    let digest = EVP_PKEY_get_bits(key) >= 384 && EVP_PKEY_is_a(key, "EC") == 1 ? EVP_sha384() : EVP_sha256()
    guard X509_sign(x, key, digest) > 0 else {
      ERR_clear_error()
      throw RAError("signing the certificate failed")
    }
    owned = nil
    return Certificate(owning: x)
  }
}

private let freeExtension: @convention(c) (UnsafeMutableRawPointer?) -> Void = {
  X509_EXTENSION_free(OpaquePointer($0))
}

/// A registration authority's own failure (configuration, signing).
public struct RAError: Error, CustomStringConvertible, Sendable {
  public var description: String
  public init(_ description: String) { self.description = description }
}
