internal import COpenSSL
import EdgeKeyCore
import FoundationEssentials

/// A certificate revocation list as received (RFC 5280 §5): parsed, with what a relying party
/// checks before it uses one.
public struct CertificateRevocationList: Sendable, Equatable {
  /// The CRL, DER.
  public let der: [UInt8]
  /// The issuer, as RFC 2253 text.
  public let issuer: String
  /// When it was signed.
  public let thisUpdate: Date
  /// nil when the CRL gives none (it then never goes stale by itself).
  public let nextUpdate: Date?
  /// The CRL number extension, if present.
  public let number: Int64?
  /// Serials listed (upper-case hex).
  public let revokedSerials: [String]

  /// The CRL as PEM.
  public var pem: String { PEM.encode(der, label: "X509 CRL") }

  /// Parses one CRL, DER or PEM.
  public init(bytes: [UInt8]) throws(TLSError) {
    var der = bytes
    if let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN X509 CRL-----") {
      guard let decoded = PEM.decode(text, label: "X509 CRL") else {
        throw TLSError(.configuration, .other, "the CRL's PEM is malformed")
      }
      der = decoded
    }
    let crl = try parseDER(der, "CRL", code: .other, { d2i_X509_CRL(nil, $0, $1) }, free: X509_CRL_free)
    defer { X509_CRL_free(crl) }
    self.der = der
    issuer = nameString(X509_CRL_get_issuer(crl))
    thisUpdate = date(X509_CRL_get0_lastUpdate(crl))
    nextUpdate = X509_CRL_get0_nextUpdate(crl).map { date($0) }
    var critical: Int32 = 0
    if let raw = X509_CRL_get_ext_d2i(crl, NID_crl_number, &critical, nil) {
      let integer = raw.assumingMemoryBound(to: ASN1_INTEGER.self)
      var value: Int64 = 0
      number = ASN1_INTEGER_get_int64(&value, integer) == 1 ? value : nil
      ASN1_INTEGER_free(integer)
    } else {
      number = nil
    }
    var serials: [String] = []
    if let revoked = X509_CRL_get_REVOKED(crl) {
      for i in 0..<OPENSSL_sk_num(revoked) {
        guard let entry = OPENSSL_sk_value(revoked, i),
          let bn = ASN1_INTEGER_to_BN(X509_REVOKED_get0_serialNumber(OpaquePointer(entry)), nil)
        else { continue }
        if let hex = BN_bn2hex(bn) {
          serials.append(String(cString: hex))
          CRYPTO_free(hex, #file, #line)
        }
        BN_free(bn)
      }
    }
    revokedSerials = serials
    ERR_clear_error()
  }

  /// The certificate among `issuers` whose subject is this CRL's issuer and whose key signed it,
  /// or nil.
  public func signer(among issuers: [Certificate]) -> Certificate? {
    guard let crl = try? parseDER(der, "CRL", code: .other, { d2i_X509_CRL(nil, $0, $1) }, free: X509_CRL_free) else {
      return nil
    }
    defer { X509_CRL_free(crl) }
    let found = issuers.first { candidate in
      candidate.subject == issuer && X509_get0_pubkey(candidate.x509).map { X509_CRL_verify(crl, $0) == 1 } == true
    }
    ERR_clear_error()
    return found
  }

  /// Whether it is current at `date`: issued before it, and its nextUpdate not passed.
  public func isCurrent(at date: Date = Date()) -> Bool {
    thisUpdate <= date.addingTimeInterval(300) && (nextUpdate.map { date < $0 } ?? true)
  }
}
