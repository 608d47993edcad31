internal import COpenSSL
import EdgeKeyCore
import EdgeKeyTPM

/// A TPM key attestation as a PKCS#10 attribute, following draft-ietf-lamps-csr-attestation-29:
/// the attribute `id-aa-attestation` (1.2.840.113549.1.9.16.2.59) holds one AttestationBundle,
/// whose statement is the TCG's `tcg-attest-tpm-certify` (2.23.133.20.1):
///
///     AttestationBundle ::= SEQUENCE {
///        attestations SEQUENCE SIZE (1..MAX) OF AttestationStatement,
///        certs SEQUENCE SIZE (1..MAX) OF LimitedCertChoices OPTIONAL }
///     AttestationStatement ::= SEQUENCE { type OBJECT IDENTIFIER, stmt ANY }
///     Tcg-csr-tpm-certify ::= SEQUENCE {
///        tpmSAttest OCTET STRING,   -- TPMS_ATTEST, as signed
///        signature  OCTET STRING,   -- TPMT_SIGNATURE
///        tpmTPublic OCTET STRING OPTIONAL }  -- TPMT_PUBLIC of the certified key
///
/// `certs` carries the attestation key's certificate (X.509, the `certificate` choice).
public struct KeyAttestation: Sendable, Equatable {
  /// id-aa-attestation (early-allocated as id-aa-evidence).
  public static let attributeOID = "1.2.840.113549.1.9.16.2.59"
  /// tcg-attest-tpm-certify.
  public static let tpmCertifyOID = "2.23.133.20.1"

  /// The TPM2_Certify statement.
  public var evidence: CertifyEvidence
  /// DER certificates that come with it: the attestation key's first.
  public var certificates: [[UInt8]]

  /// Evidence and the certificates (DER) that vouch for the key that made it.
  public init(evidence: CertifyEvidence, certificates: [[UInt8]]) {
    self.evidence = evidence
    self.certificates = certificates
  }

  /// The AttestationBundle's DER.
  public var der: [UInt8] {
    let statement = DER.sequence([
      DER.octetString(evidence.attest), DER.octetString(evidence.signature),
      DER.octetString(evidence.certifiedPublicArea),
    ])
    var bundle = [DER.sequence([DER.sequence([DER.oid(Self.tpmCertifyOID)!, statement])])]
    if !certificates.isEmpty { bundle.append(DER.sequence(certificates)) }
    return DER.sequence(bundle)
  }

  /// Reads an AttestationBundle with one `tcg-attest-tpm-certify` statement (statements of other
  /// types are skipped; a bundle without one is refused). Throws saying what is wrong.
  public init(bundle der: [UInt8]) throws(TLSError) {
    func bad(_ why: String) -> TLSError { TLSError(.configuration, .other, "the key attestation: \(why)") }
    var top = DERReader(der[...])
    guard let bundle = top.next(), bundle.tag == 0x30, top.atEnd else { throw bad("not one DER SEQUENCE") }
    var fields = DERReader(bundle.content)
    guard let statements = fields.next(), statements.tag == 0x30 else { throw bad("no attestations") }
    var found: CertifyEvidence? = nil
    var list = DERReader(statements.content)
    while !list.atEnd {
      guard let statement = list.next(), statement.tag == 0x30 else { throw bad("a statement is not a SEQUENCE") }
      var parts = DERReader(statement.content)
      guard let type = parts.next(), type.tag == 0x06, let value = parts.next(), parts.atEnd else {
        throw bad("a statement is not { type, stmt }")
      }
      guard DERReader.dotted(type.content) == Self.tpmCertifyOID else { continue }
      guard found == nil else { throw bad("more than one tcg-attest-tpm-certify statement") }
      guard value.tag == 0x30 else { throw bad("the tcg-attest-tpm-certify statement is not a SEQUENCE") }
      var items = DERReader(value.content)
      var strings: [[UInt8]] = []
      while !items.atEnd {
        guard let item = items.next(), item.tag == 0x04 else {
          throw bad("tcg-attest-tpm-certify holds a non-OCTET STRING")
        }
        strings.append(Array(item.content))
      }
      guard strings.count == 3 else {
        throw bad(
          strings.count == 2
            ? "the certified key's public area (tpmTPublic) is missing"
            : "tcg-attest-tpm-certify has \(strings.count) fields")
      }
      found = CertifyEvidence(attest: strings[0], signature: strings[1], certifiedPublicArea: strings[2])
    }
    guard let found else { throw bad("no tcg-attest-tpm-certify statement") }
    var certificates: [[UInt8]] = []
    if let certs = fields.next() {
      guard certs.tag == 0x30 else { throw bad("certs is not a SEQUENCE") }
      var reader = DERReader(certs.content)
      var start = certs.content.startIndex
      while !reader.atEnd {
        guard let c = reader.next() else { throw bad("a certificate is not DER") }
        // Only the X.509 `certificate` choice (a SEQUENCE) is of use here; `other` is skipped.
        let end = c.content.endIndex
        if c.tag == 0x30 { certificates.append(Array(certs.content[start..<end])) }
        start = end
      }
    }
    guard fields.atEnd else { throw bad("trailing fields after certs") }
    self.init(evidence: found, certificates: certificates)
  }
}
