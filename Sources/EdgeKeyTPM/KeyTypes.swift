internal import CEdgeKeyProvider
internal import CTSS2

/// The kinds of device key EdgeKey creates. ECC P-256 is the default: every TPM has it and a
/// real chip signs with it in tens of milliseconds, where RSA-2048 takes hundreds.
public enum KeyAlgorithm: String, Sendable, CaseIterable, Codable, CustomStringConvertible {
  /// ECDSA on NIST P-256: every TPM 2.0 has it.
  case eccP256 = "ecc-p256"
  /// ECDSA on NIST P-384 (not on every chip).
  case eccP384 = "ecc-p384"
  /// RSA 2048.
  case rsa2048 = "rsa-2048"
  /// RSA 3072 (not on every chip).
  case rsa3072 = "rsa-3072"

  public var description: String { rawValue }

  /// True for the ECC kinds.
  public var isECC: Bool { self == .eccP256 || self == .eccP384 }

  /// The digest that matches the key's strength (SHA-384 for P-384, else SHA-256).
  public var preferredHash: HashAlgorithm { self == .eccP384 ? .sha384 : .sha256 }

  /// Reads the kind from a TPM public area; nil for keys EdgeKey does not make.
  init?(publicArea p: TPMT_PUBLIC) {
    switch p.type {
    case TPM2_ALG_ECC:
      switch p.parameters.eccDetail.curveID {
      case TPM2_ECC_NIST_P256: self = .eccP256
      case TPM2_ECC_NIST_P384: self = .eccP384
      default: return nil
      }
    case TPM2_ALG_RSA:
      switch p.parameters.rsaDetail.keyBits {
      case 2048: self = .rsa2048
      case 3072: self = .rsa3072
      default: return nil
      }
    default: return nil
    }
  }

  /// The creation template: a non-exportable, unrestricted signing key; noDA unless
  /// `dictionaryAttackProtected` (keys with a password).
  func template(dictionaryAttackProtected: Bool = false) -> TPM2B_PUBLIC {
    var t = TPM2B_PUBLIC()
    t.publicArea.nameAlg = TPM2_ALG_SHA256
    t.publicArea.objectAttributes =
      (dictionaryAttackProtected ? ObjectAttributes.passwordDeviceKey : ObjectAttributes.deviceKey).rawValue
    switch self {
    case .eccP256, .eccP384:
      t.publicArea.type = TPM2_ALG_ECC
      t.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL
      // No fixed scheme: each TPM2_Sign names ECDSA and the digest's hash.
      t.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL
      t.publicArea.parameters.eccDetail.curveID =
        self == .eccP256 ? TPM2_ECC_NIST_P256 : TPM2_ECC_NIST_P384
      t.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL
    case .rsa2048, .rsa3072:
      t.publicArea.type = TPM2_ALG_RSA
      t.publicArea.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL
      // No fixed scheme, so one key signs PKCS#1 v1.5 (TLS 1.2) and PSS (TLS 1.3).
      t.publicArea.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL
      t.publicArea.parameters.rsaDetail.keyBits = self == .rsa2048 ? 2048 : 3072
      t.publicArea.parameters.rsaDetail.exponent = 0
    }
    return t
  }
}

/// Digest algorithms a TPM signature can name.
public enum HashAlgorithm: String, Sendable, CaseIterable, Codable {
  /// The digests a TPM signs.
  case sha1, sha256, sha384, sha512

  /// Length of the digest in bytes.
  public var digestLength: Int {
    switch self {
    case .sha1: 20
    case .sha256: 32
    case .sha384: 48
    case .sha512: 64
    }
  }

  var tpmID: TPM2_ALG_ID {
    switch self {
    case .sha1: TPM2_ALG_SHA1
    case .sha256: TPM2_ALG_SHA256
    case .sha384: TPM2_ALG_SHA384
    case .sha512: TPM2_ALG_SHA512
    }
  }
}

/// RSA signature padding. ECDSA keys ignore it.
public enum RSAPadding: String, Sendable, Codable {
  /// RSASSA-PKCS1-v1_5 (TLS 1.2, X.509).
  case pkcs1
  /// RSASSA-PSS; TLS 1.3 requires a salt as long as the digest, which the TPM is asked for.
  case pss
}

/// TPMA_OBJECT: what a TPM object may do and whether it can leave the TPM.
public struct ObjectAttributes: OptionSet, Sendable, Hashable, CustomStringConvertible {
  public var rawValue: UInt32
  public init(rawValue: UInt32) { self.rawValue = rawValue }

  /// The key is bound to this TPM's hierarchy: it never leaves it.
  public static let fixedTPM = ObjectAttributes(rawValue: 0x0000_0002)
  /// The object is flushed at TPM2_Startup(CLEAR).
  public static let stClear = ObjectAttributes(rawValue: 0x0000_0004)
  /// The key cannot be duplicated to another parent.
  public static let fixedParent = ObjectAttributes(rawValue: 0x0000_0010)
  /// The TPM generated the private part.
  public static let sensitiveDataOrigin = ObjectAttributes(rawValue: 0x0000_0020)
  /// The key's own authorization (a password) may be used.
  public static let userWithAuth = ObjectAttributes(rawValue: 0x0000_0040)
  /// Administrative use needs a policy session.
  public static let adminWithPolicy = ObjectAttributes(rawValue: 0x0000_0080)
  /// Not subject to dictionary-attack protection.
  public static let noDA = ObjectAttributes(rawValue: 0x0000_0400)
  /// Duplication needs an inner wrapper.
  public static let encryptedDuplication = ObjectAttributes(rawValue: 0x0000_0800)
  /// The key signs only TPM-made structures (an AK) or is a storage parent.
  public static let restricted = ObjectAttributes(rawValue: 0x0001_0000)
  /// The key decrypts (a storage parent).
  public static let decrypt = ObjectAttributes(rawValue: 0x0002_0000)
  /// The key signs.
  public static let sign = ObjectAttributes(rawValue: 0x0004_0000)

  /// What EdgeKey's device keys are created with: the private key can never leave this TPM
  /// (fixedTPM, fixedParent, generated inside it), usable with a password or none, exempt from
  /// dictionary-attack lockout (power cuts mid-authorization are a known field failure), sign only.
  public static let deviceKey: ObjectAttributes = [
    .fixedTPM, .fixedParent, .sensitiveDataOrigin, .userWithAuth, .noDA, .sign,
  ]

  /// An attestation key: as ``deviceKey``, restricted (it signs only what the TPM made).
  public static let attestationKey: ObjectAttributes = deviceKey.union(.restricted)

  /// A device key with a password: as ``deviceKey`` but DA-protected (no noDA), so that the
  /// TPM's dictionary-attack lockout bounds how often the password can be guessed.
  public static let passwordDeviceKey: ObjectAttributes = deviceKey.subtracting(.noDA)

  /// True when the private part can neither be duplicated nor exported.
  public var isNonExportable: Bool { contains([.fixedTPM, .fixedParent, .sensitiveDataOrigin]) }

  /// The names tpm2-tools prints, joined with `|` (e.g. `fixedtpm|fixedparent|...|sign`).
  public var description: String {
    let names: [(ObjectAttributes, String)] = [
      (.fixedTPM, "fixedtpm"), (.stClear, "stclear"), (.fixedParent, "fixedparent"),
      (.sensitiveDataOrigin, "sensitivedataorigin"), (.userWithAuth, "userwithauth"),
      (.adminWithPolicy, "adminwithpolicy"), (.noDA, "noda"),
      (.encryptedDuplication, "encryptedduplication"), (.restricted, "restricted"),
      (.decrypt, "decrypt"), (.sign, "sign"),
    ]
    return names.filter { contains($0.0) }.map(\.1).joined(separator: "|")
  }
}

/// A persistent TPM handle (0x81000000–0x81FFFFFF).
public struct PersistentHandle: RawRepresentable, Hashable, Sendable, Codable, CustomStringConvertible {
  public var rawValue: UInt32
  /// Nil unless `rawValue` lies in the persistent range.
  public init?(rawValue: UInt32) {
    guard rawValue >> 24 == 0x81 else { return nil }
    self.rawValue = rawValue
  }
  /// Parses `0x81000002` or `2164260866`.
  public init?(_ text: String) {
    let value: UInt32? =
      text.lowercased().hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
    guard let value else { return nil }
    self.init(rawValue: value)
  }
  /// The storage root key's conventional handle.
  public static let storageRootKey = PersistentHandle(rawValue: EDGEKEY_SRK_HANDLE)!
  public var description: String { "0x" + String(rawValue, radix: 16, uppercase: false) }
}
