internal import COpenSSL
internal import CTSS2
import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

/// What the registration authority trusts and requires of key attestation.
public struct AttestationPolicy: Sendable {
  /// tcg-kp-AIKCertificate: the only extended key usage of the AK certificates this RA issues.
  public static let attestationKeyUsage = "2.23.133.8.3"

  /// The TPM manufacturers' CAs (roots or intermediates) an EK certificate must chain to.
  public var manufacturerCAs: [Certificate]
  /// Refuse every request that carries no key attestation this RA verified. Without it, a
  /// device must attest when an operator asked for it (`admin require-attestation`) or once
  /// it has activated an attestation key (no downgrade).
  public var requireForAll: Bool
  /// How long a nonce may be used (once).
  public var nonceLifetime: Duration
  /// How long a credential challenge may be answered (once).
  public var activationLifetime: Duration
  /// Lifetime of AK certificates.
  public var attestationKeyCertificateLifetime: Duration

  /// A policy trusting `manufacturerCAs` for EK certificates.
  public init(
    manufacturerCAs: [Certificate], requireForAll: Bool = false, nonceLifetime: Duration = .seconds(300),
    activationLifetime: Duration = .seconds(300),
    attestationKeyCertificateLifetime: Duration = .seconds(10 * 365 * 86400)
  ) {
    self.manufacturerCAs = manufacturerCAs
    self.requireForAll = requireForAll
    self.nonceLifetime = nonceLifetime
    self.activationLifetime = activationLifetime
    self.attestationKeyCertificateLifetime = attestationKeyCertificateLifetime
  }
}

/// Evidence the RA verified: the AK that signed it (its certificate is this CA's) and the key
/// it certified, which is the request's.
package struct VerifiedKeyAttestation: Sendable {
  package var attestationKeyCertificate: Certificate
  /// SHA-256 of the AK's SubjectPublicKeyInfo.
  package var attestationKeyFingerprint: String
  /// The certified key's TPM Name, hex.
  package var keyName: String
  /// TPMS_ATTEST.extraData: the nonce it was made over.
  package var nonce: [UInt8]
}

/// Checks a `tcg-attest-tpm-certify` statement against a request, with no registry or nonce
/// store (those are the caller's): every failure is a sentence for the 403.
package enum EvidenceVerifier {
  package struct Refused: Error, CustomStringConvertible {
    package var description: String
    init(_ d: String) { description = d }
  }

  /// TPM_GENERATED_VALUE and TPM_ST_ATTEST_CERTIFY.
  static let generated: UInt32 = 0xFF54_4347
  static let certifyTag: UInt16 = 0x8017

  package static func verify(
    _ attestation: KeyAttestation, for csr: CertificateSigningRequest, anchors: [Certificate], at date: Date = Date()
  ) throws(Refused) -> VerifiedKeyAttestation {
    let evidence = attestation.evidence
    // The attestation key: a certificate this CA issued for an AK (after activation), current.
    var akCertificate: Certificate? = nil
    var lastProblem = "the bundle carries no certificate"
    for der in attestation.certificates {
      guard let c = try? Certificate(der: der) else {
        lastProblem = "a certificate in the bundle is not DER X.509"
        continue
      }
      guard c.extendedKeyUsageOIDs.contains(AttestationPolicy.attestationKeyUsage) else {
        lastProblem = "\(c.subject) is not an attestation key certificate (no tcg-kp-AIKCertificate usage)"
        continue
      }
      do {
        _ = try Certificate.verifiedChain(leaf: c, untrusted: [], anchors: anchors, purpose: .any, at: date)
        akCertificate = c
        break
      } catch {
        lastProblem = "the attestation key certificate \(c.subject) does not verify against this CA: \(error.reason)"
      }
    }
    guard let akCertificate else {
      throw Refused("no attestation key certificate from this CA (an AK activated here): \(lastProblem)")
    }

    // The statement: TPM-generated, a certify structure, signed by that AK.
    let attested = try certifyInfo(evidence.attest)
    try verifySignature(evidence.signature, over: evidence.attest, by: akCertificate.publicKeyDER)

    // The certified key: its Name is the one attested, its attributes keep it in the TPM, and
    // it is the key the request is for.
    let key: PublicKey
    do { key = try PublicKey(publicArea: evidence.certifiedPublicArea) } catch {
      throw Refused("tpmTPublic is not a TPMT_PUBLIC")
    }
    guard !key.name.isEmpty, key.name == attested.name else {
      throw Refused("the certified Name is not the Name of the public area sent with it")
    }
    let a = key.attributes
    var missing: [String] = []
    if !a.contains(.fixedTPM) { missing.append("fixedTPM") }
    if !a.contains(.fixedParent) { missing.append("fixedParent") }
    if !a.contains(.sensitiveDataOrigin) { missing.append("sensitiveDataOrigin") }
    if !a.contains(.sign) { missing.append("sign") }
    guard missing.isEmpty else {
      throw Refused(
        "the certified key can leave its TPM or was not made in it: no \(missing.joined(separator: ", ")) [\(a)]")
    }
    guard !a.contains(.restricted) else { throw Refused("the certified key is restricted (an attestation key)") }
    guard samePublicKey(key.spki, csr.publicKeyDER) else {
      throw Refused("the certified key is not the request's key")
    }
    let nonce = attested.extraData
    return VerifiedKeyAttestation(
      attestationKeyCertificate: akCertificate,
      attestationKeyFingerprint: Certificate.sha256Hex(akCertificate.publicKeyDER),
      keyName: key.name.map { String(format: "%02x", $0) }.joined(), nonce: nonce)
  }

  /// The parts of a TPMS_ATTEST from TPM2_Certify a verifier uses: its extraData (the nonce)
  /// and the certified object's Name. Refused unless it is TPM-generated and a certify structure.
  package static func certifyInfo(_ bytes: [UInt8]) throws(Refused) -> (extraData: [UInt8], name: [UInt8]) {
    var attest = TPMS_ATTEST()
    var offset = 0
    let rc = bytes.withUnsafeBufferPointer { Tss2_MU_TPMS_ATTEST_Unmarshal($0.baseAddress, $0.count, &offset, &attest) }
    guard rc == 0, offset == bytes.count else { throw Refused("tpmSAttest is not a TPMS_ATTEST") }
    guard attest.magic == generated else {
      throw Refused("the attested structure was not generated by a TPM (magic is not TPM_GENERATED_VALUE)")
    }
    guard attest.type == certifyTag else {
      throw Refused(String(format: "the attested structure is not from TPM2_Certify (type 0x%04x)", attest.type))
    }
    let name = withUnsafeBytes(of: attest.attested.certify.name.name) {
      Array($0.prefix(Int(attest.attested.certify.name.size)))
    }
    let extraData = withUnsafeBytes(of: attest.extraData.buffer) { Array($0.prefix(Int(attest.extraData.size))) }
    return (extraData, name)
  }

  /// A TPMT_SIGNATURE (ECDSA, RSASSA or RSA-PSS, SHA-256/384/512) over `data` by `spki`.
  package static func verifySignature(_ marshaled: [UInt8], over data: [UInt8], by spki: [UInt8]) throws(Refused) {
    var signature = TPMT_SIGNATURE()
    var offset = 0
    let rc = marshaled.withUnsafeBufferPointer {
      Tss2_MU_TPMT_SIGNATURE_Unmarshal($0.baseAddress, $0.count, &offset, &signature)
    }
    guard rc == 0, offset == marshaled.count else { throw Refused("the signature is not a TPMT_SIGNATURE") }
    let der: [UInt8]
    let hash: TPM2_ALG_ID
    var pss = false
    switch signature.sigAlg {
    case TPM2_ALG_ECDSA:
      let e = signature.signature.ecdsa
      hash = e.hash
      let r = withUnsafeBytes(of: e.signatureR.buffer) { Array($0.prefix(Int(e.signatureR.size))) }
      let s = withUnsafeBytes(of: e.signatureS.buffer) { Array($0.prefix(Int(e.signatureS.size))) }
      der = DER.sequence([DER.integer(unsigned: r), DER.integer(unsigned: s)])
    case TPM2_ALG_RSASSA, TPM2_ALG_RSAPSS:
      let r = signature.sigAlg == TPM2_ALG_RSASSA ? signature.signature.rsassa : signature.signature.rsapss
      hash = r.hash
      pss = signature.sigAlg == TPM2_ALG_RSAPSS
      der = withUnsafeBytes(of: r.sig.buffer) { Array($0.prefix(Int(r.sig.size))) }
    default:
      throw Refused(String(format: "the signature scheme 0x%04x is not ECDSA or RSA", signature.sigAlg))
    }
    let md: OpaquePointer?
    switch hash {
    case TPM2_ALG_SHA256: md = EVP_sha256()
    case TPM2_ALG_SHA384: md = EVP_sha384()
    case TPM2_ALG_SHA512: md = EVP_sha512()
    default: throw Refused(String(format: "the signature's hash 0x%04x is not SHA-256, -384 or -512", hash))
    }
    guard let key = CredentialProtection.parsePublicKey(spki) else { throw Refused("the AK's public key is unusable") }
    defer { EVP_PKEY_free(key) }
    guard let ctx = EVP_MD_CTX_new() else { throw Refused("out of memory") }
    defer { EVP_MD_CTX_free(ctx) }
    var pctx: OpaquePointer? = nil
    guard EVP_DigestVerifyInit(ctx, &pctx, md, nil, key) == 1 else {
      ERR_clear_error()
      throw Refused("the signature cannot be checked with the AK's key")
    }
    if pss {
      EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING)
      EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_AUTO)
    }
    let ok = EVP_DigestVerify(ctx, der, der.count, data, data.count)
    ERR_clear_error()
    guard ok == 1 else { throw Refused("the attestation key's signature over the TPMS_ATTEST does not verify") }
  }

  /// Whether two SubjectPublicKeyInfos are the same key (EVP_PKEY_eq, not their bytes).
  static func samePublicKey(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard let x = CredentialProtection.parsePublicKey(a), let y = CredentialProtection.parsePublicKey(b) else {
      return false
    }
    defer {
      EVP_PKEY_free(x)
      EVP_PKEY_free(y)
    }
    return EVP_PKEY_eq(x, y) == 1
  }
}
