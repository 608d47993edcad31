internal import COpenSSL

/// The "certs-only" PKCS#7 (CMS SignedData with no content and no signers) that EST uses to
/// carry certificates (RFC 7030 §4.1.3, §4.2.3): a bag of certificates, in no promised order.
public enum CertsOnlyPKCS7 {
  /// Encodes `certificates` as DER.
  public static func encode(_ certificates: [Certificate]) throws(TLSError) -> [UInt8] {
    guard let p7 = PKCS7_new() else { throw TLSError(.tls, .other, "out of memory") }
    defer { PKCS7_free(p7) }
    guard PKCS7_set_type(p7, NID_pkcs7_signed) == 1, PKCS7_content_new(p7, NID_pkcs7_data) == 1 else {
      ERR_clear_error()
      throw TLSError(.tls, .other, "cannot build a PKCS#7 structure")
    }
    for certificate in certificates {
      guard PKCS7_add_certificate(p7, certificate.x509) == 1 else {
        ERR_clear_error()
        throw TLSError(.tls, .other, "cannot add a certificate to PKCS#7")
      }
    }
    var out: UnsafeMutablePointer<UInt8>?
    let n = i2d_PKCS7(p7, &out)
    defer { CRYPTO_free(out, #file, #line) }
    guard n > 0, let out else { throw TLSError(.tls, .other, "cannot encode PKCS#7") }
    return Array(UnsafeBufferPointer(start: out, count: Int(n)))
  }

  /// Decodes DER; refuses anything but SignedData, trailing bytes, and an empty bag.
  public static func decode(_ der: [UInt8]) throws(TLSError) -> [Certificate] {
    let p7 = try parseDER(
      der, "PKCS#7 structure", code: .badCertificateChain, { d2i_PKCS7(nil, $0, $1) }, free: PKCS7_free)
    defer { PKCS7_free(p7) }
    guard OBJ_obj2nid(p7.pointee.type) == NID_pkcs7_signed, let signed = p7.pointee.d.sign else {
      throw TLSError(.configuration, .badCertificateChain, "the PKCS#7 structure is not SignedData")
    }
    guard let stack = signed.pointee.cert, OPENSSL_sk_num(stack) > 0 else {
      throw TLSError(.configuration, .badCertificateChain, "the PKCS#7 structure holds no certificate")
    }
    let certificates = Certificate.copies(of: stack)
    guard certificates.count == OPENSSL_sk_num(stack) else {
      throw TLSError(.configuration, .badCertificateChain, "a certificate in the PKCS#7 structure is damaged")
    }
    return certificates
  }
}
