internal import COpenSSL
import EdgeKeyCore
import EdgeKeyTLS
import Foundation

/// A certificate revocation list the CA signed (RFC 5280 §5): v2, with a CRL number, the
/// authority key identifier and each entry's reason.
public struct RevocationList: Sendable {
  /// The signed CRL, DER.
  public let der: [UInt8]
  /// Its CRL number (it only grows).
  public let number: Int64
  /// When it was signed.
  public let thisUpdate: Date
  /// When the next one is due.
  public let nextUpdate: Date
  /// The serials listed (upper-case hex).
  public let serials: [String]

  /// PEM, as mosquitto's `crlfile` and `openssl crl` read it.
  public var pem: String { PEM.encode(der, label: "X509 CRL") }
}

extension CertificateAuthority {
  /// Signs a CRL listing `revoked`, valid from now until `validity` from now.
  public func revocationList(_ revoked: [CertificateRecord], number: Int64, validity: Duration)
    throws(RAError) -> RevocationList
  {
    guard let crl = X509_CRL_new() else { throw RAError("out of memory") }
    defer { X509_CRL_free(crl) }
    X509_CRL_set_version(crl, 1)
    X509_CRL_set_issuer_name(crl, X509_get_subject_name(certificate.x509))
    let now = Date()
    let next = now.addingTimeInterval(validity.seconds)
    let thisUpdate = ASN1_TIME_set(nil, time_t(now.timeIntervalSince1970))
    let nextUpdate = ASN1_TIME_set(nil, time_t(next.timeIntervalSince1970))
    defer {
      ASN1_TIME_free(thisUpdate)
      ASN1_TIME_free(nextUpdate)
    }
    X509_CRL_set1_lastUpdate(crl, thisUpdate)
    X509_CRL_set1_nextUpdate(crl, nextUpdate)
    for record in revoked {
      guard let entry = X509_REVOKED_new() else { throw RAError("out of memory") }
      var bn: OpaquePointer?
      let parsed = BN_hex2bn(&bn, record.serial) > 0
      let serial = parsed ? BN_to_ASN1_INTEGER(bn, nil) : nil
      BN_free(bn)
      let date = ASN1_TIME_set(nil, time_t((record.revoked ?? now).timeIntervalSince1970))
      let reason = ASN1_ENUMERATED_new()
      ASN1_ENUMERATED_set(reason, Int(record.reason?.code ?? 0))
      defer {
        ASN1_INTEGER_free(serial)
        ASN1_TIME_free(date)
        ASN1_ENUMERATED_free(reason)
      }
      guard let serial, X509_REVOKED_set_serialNumber(entry, serial) == 1,
        X509_REVOKED_set_revocationDate(entry, date) == 1,
        X509_REVOKED_add1_ext_i2d(entry, NID_crl_reason, UnsafeMutableRawPointer(reason), 0, 0) == 1
      else {
        X509_REVOKED_free(entry)
        ERR_clear_error()
        throw RAError("cannot list serial \(record.serial) in the CRL")
      }
      X509_CRL_add0_revoked(crl, entry)
    }
    X509_CRL_sort(crl)
    let crlNumber = ASN1_INTEGER_new()
    defer { ASN1_INTEGER_free(crlNumber) }
    ASN1_INTEGER_set_int64(crlNumber, number)
    X509_CRL_add1_ext_i2d(crl, NID_crl_number, UnsafeMutableRawPointer(crlNumber), 0, 0)
    if X509_get_ext_by_NID(certificate.x509, NID_subject_key_identifier, -1) >= 0 {
      var v3 = X509V3_CTX()
      X509V3_set_ctx(&v3, certificate.x509, nil, nil, crl, 0)
      if let ext = X509V3_EXT_conf_nid(nil, &v3, NID_authority_key_identifier, "keyid") {
        X509_CRL_add_ext(crl, ext, -1)
        X509_EXTENSION_free(ext)
      }
      ERR_clear_error()
    }
    guard sign(crl: crl) else {
      ERR_clear_error()
      throw RAError("signing the CRL failed")
    }
    var out: UnsafeMutablePointer<UInt8>?
    let n = i2d_X509_CRL(crl, &out)
    defer { CRYPTO_free(out, #file, #line) }
    guard n > 0, let out else { throw RAError("cannot encode the CRL") }
    return RevocationList(
      der: Array(UnsafeBufferPointer(start: out, count: Int(n))), number: number, thisUpdate: now, nextUpdate: next,
      serials: revoked.map(\.serial))
  }
}
