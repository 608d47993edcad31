import EdgeKeyCore
import EdgeKeyTPM

/// What an EST server's `/csrattrs` asks a request to carry (RFC 7030 §4.5.2, clarified by
/// RFC 9148 §3): `CsrAttrs ::= SEQUENCE OF AttrOrOID`, each an OID (a wish: "use this") or an
/// `Attribute { type, values }` (the wish with its parameters).
///
/// Understood: the key type and its curve or size (id-ecPublicKey with a curve, rsaEncryption
/// with a size), the signature's hash (ecdsa-with-SHA256/384/512, shaNNNWithRSAEncryption), a
/// challengePassword, key attestation, and the extensions the request can carry (subjectAltName, keyUsage,
/// extKeyUsage). Everything else is listed in ``notUnderstood``, for the caller to report.
public struct CSRAttributes: Sendable, Equatable {
  /// The key the server wants, when it named one EdgeKey makes.
  public var keyAlgorithm: KeyAlgorithm?
  /// The hash the server wants the request signed with.
  public var signatureHash: HashAlgorithm?
  /// The server wants a challengePassword (RFC 7030 §3.5: the connection's tls-unique).
  public var challengePassword = false
  /// The server wants key attestation (id-aa-attestation, draft-ietf-lamps-csr-attestation).
  public var keyAttestation = false
  /// Extensions the server asked for that the request carries (dotted OIDs).
  public var requestedExtensions: [String] = []
  /// Attributes, OIDs and parameters we do not understand (dotted OIDs, with what about them).
  public var notUnderstood: [String] = []

  /// No attributes asked for.
  public init() {}

  static let challengePasswordOID = "1.2.840.113549.1.9.7"
  static let attestationOID = "1.2.840.113549.1.9.16.2.59"
  static let extensionRequestOID = "1.2.840.113549.1.9.14"
  static let ecPublicKeyOID = "1.2.840.10045.2.1"
  static let rsaEncryptionOID = "1.2.840.113549.1.1.1"
  static let curves: [String: KeyAlgorithm] = ["1.2.840.10045.3.1.7": .eccP256, "1.3.132.0.34": .eccP384]
  static let hashes: [String: HashAlgorithm] = [
    "1.2.840.10045.4.3.2": .sha256, "1.2.840.10045.4.3.3": .sha384, "1.2.840.10045.4.3.4": .sha512,
    "1.2.840.113549.1.1.11": .sha256, "1.2.840.113549.1.1.12": .sha384, "1.2.840.113549.1.1.13": .sha512,
  ]
  /// Extensions every request of ours carries when there is something to put in them.
  static let carriedExtensions: Set<String> = ["2.5.29.17", "2.5.29.15", "2.5.29.37"]

  /// Reads the DER of a csrattrs answer. Throws `.malformedResponse` for anything that is not a
  /// SEQUENCE of OIDs and attributes.
  public init(der: [UInt8]) throws(EnrollmentError) {
    var reader = DERReader(der[...])
    guard let top = reader.next(), top.tag == 0x30, reader.atEnd else {
      throw EnrollmentError(.malformedResponse, "csrattrs is not a SEQUENCE")
    }
    var items = DERReader(top.content)
    while let item = items.next() {
      switch item.tag {
      case 0x06: take(oid: DERReader.dotted(item.content))
      case 0x30:
        var fields = DERReader(item.content)
        guard let type = fields.next(), type.tag == 0x06, let set = fields.next(), set.tag == 0x31 else {
          throw EnrollmentError(.malformedResponse, "csrattrs: an attribute is not { OID, SET }")
        }
        take(attribute: DERReader.dotted(type.content), values: set.content)
      default:
        throw EnrollmentError(.malformedResponse, "csrattrs: an element is neither an OID nor an attribute")
      }
    }
  }

  private mutating func take(oid: String) {
    if oid == Self.challengePasswordOID {
      challengePassword = true
    } else if oid == Self.attestationOID {
      keyAttestation = true
    } else if let hash = Self.hashes[oid] {
      signatureHash = hash
    } else if oid == Self.ecPublicKeyOID || oid == Self.rsaEncryptionOID {
      // A key type without parameters: the curve or size is ours to choose.
      if oid == Self.ecPublicKeyOID, keyAlgorithm?.isECC != true { keyAlgorithm = .eccP256 }
      if oid == Self.rsaEncryptionOID, keyAlgorithm == nil || keyAlgorithm!.isECC { keyAlgorithm = .rsa2048 }
    } else if let curve = Self.curves[oid] {
      keyAlgorithm = curve
    } else {
      notUnderstood.append(oid)
    }
  }

  private mutating func take(attribute type: String, values: ArraySlice<UInt8>) {
    var reader = DERReader(values)
    switch type {
    case Self.ecPublicKeyOID:
      while let value = reader.next() {
        let curve = value.tag == 0x06 ? DERReader.dotted(value.content) : "?"
        if let algorithm = Self.curves[curve] {
          keyAlgorithm = algorithm
        } else {
          notUnderstood.append("\(type) curve \(curve)")
        }
      }
    case Self.rsaEncryptionOID:
      while let value = reader.next() {
        let bits = value.tag == 0x02 ? value.content.reduce(0) { $0 << 8 | Int($1) } : 0
        switch bits {
        case 2048: keyAlgorithm = .rsa2048
        case 3072: keyAlgorithm = .rsa3072
        default: notUnderstood.append("\(type) of \(bits) bits")
        }
      }
    case Self.challengePasswordOID:
      challengePassword = true
    case Self.attestationOID:
      keyAttestation = true
    case Self.extensionRequestOID:
      // The extension types asked for, however nested (RFC 7030's example lists OIDs).
      for oid in DERReader.allOIDs(values) {
        if Self.carriedExtensions.contains(oid) {
          requestedExtensions.append(oid)
        } else {
          notUnderstood.append("extension \(oid)")
        }
      }
    default:
      notUnderstood.append(type)
    }
  }
}
