import EdgeKeyCore
import Foundation

/// Where a device is in its life. Only an active device is issued certificates.
public enum DeviceState: String, Sendable, CaseIterable {
  /// May enroll and renew.
  case active
  /// Its certificates are revoked and it may not enrol again (a stolen or compromised device).
  case revoked
  /// Taken out of service: its certificates are revoked and its names released.
  case retired
}

/// How a device proves itself at its first enrollment.
public enum EnrolmentMethod: String, Sendable {
  /// A secret from the factory manifest, usable once.
  case oneTimeSecret = "secret"
  /// A bootstrap (manufacturer) certificate, identified by its SHA-256 fingerprint.
  case bootstrapCertificate = "bootstrap"
  /// The shared factory password (`--allow-shared-password`): weaker, and logged as such.
  case sharedPassword = "shared-password"
}

/// A device the registration authority knows.
public struct DeviceRecord: Sendable, Equatable {
  /// The device's identifier (its serial number in the factory manifest).
  public var id: String
  /// The names it may hold; no other device holds any of them.
  public var names: [String]
  /// Where it is in its life.
  public var state: DeviceState
  /// How it first enrolls.
  public var method: EnrolmentMethod
  /// For a bootstrap device: the SHA-256 fingerprint of its bootstrap certificate.
  public var bootstrapFingerprint: String?
  /// For a one-time secret: when it was used (nil: not yet).
  public var secretUsed: Date?
  /// When it was added.
  public var created: Date
}

/// Why a certificate was revoked (RFC 5280 §5.3.1 CRLReason).
public enum RevocationReason: String, Sendable, CaseIterable {
  /// RFC 5280 §5.3.1's reasons EdgeKey uses.
  case unspecified, keyCompromise, affiliationChanged, superseded, cessationOfOperation

  /// The CRLReason code.
  public var code: Int32 {
    switch self {
    case .unspecified: 0
    case .keyCompromise: 1
    case .affiliationChanged: 3
    case .superseded: 4
    case .cessationOfOperation: 5
    }
  }
}

/// A certificate the registration authority issued.
public struct CertificateRecord: Sendable, Equatable {
  /// Upper-case hex, as `Certificate.serialNumber`.
  public var serial: String
  /// The device it was issued to.
  public var device: String
  /// Its subject.
  public var subject: String
  /// Valid from.
  public var notBefore: Date
  /// Valid until.
  public var notAfter: Date
  /// SHA-256 of the certificate (hex).
  public var fingerprint: String
  /// SHA-256 of its SubjectPublicKeyInfo (hex).
  public var keyFingerprint: String
  /// When it was issued.
  public var issued: Date
  /// "simpleenroll" or "simplereenroll".
  public var operation: String
  /// When it was revoked, or nil.
  public var revoked: Date?
  /// Why it was revoked.
  public var reason: RevocationReason?
}

/// One line of the registry's audit trail: what happened to a device, when, on whose word.
public struct AuditEntry: Sendable, Equatable {
  /// When.
  public var time: Date
  /// The device concerned, or nil for the registry itself.
  public var device: String?
  /// "imported", "enrolled", "renewed", "refused", "revoked", "retired", ...
  public var event: String
  /// Details (never a secret).
  public var detail: String
  /// Who caused it: "admin", "est 127.0.0.1", ...
  public var source: String
}

/// A failure of the registry: its storage, or an operation it refuses.
public struct RegistryError: Error, Sendable, CustomStringConvertible, SQLiteWrapping {
  /// What went wrong.
  public enum Kind: Sendable, Equatable {
    /// The database could not be read or written; nothing was changed.
    case storage
    /// No such device or certificate.
    case notFound
    /// The change would break a rule (a name held by another device, a duplicate id).
    case conflict
    /// The input is malformed (a manifest line, a name).
    case invalid
  }
  /// What went wrong.
  public var kind: Kind
  /// Details for the operator.
  public var message: String

  /// An error of `kind`.
  public init(_ kind: Kind, _ message: String) {
    self.kind = kind
    self.message = message
  }

  package init(sqlite: SQLiteError) {
    self.init(.storage, "the registry: \(sqlite)")
  }

  public var description: String { message }
}

/// The TPM a device proved it holds: its endorsement key (from a manufacturer's certificate)
/// and the attestation key the RA certified after TPM2_ActivateCredential proved the AK is in
/// that TPM. One EK belongs to one device.
public struct AttestationRecord: Sendable, Equatable {
  /// The device.
  public var device: String
  /// SHA-256 of the EK's SubjectPublicKeyInfo, lowercase hex.
  public var endorsementKeyFingerprint: String
  /// The EK certificate's issuer (the TPM's manufacturer CA).
  public var endorsementKeyIssuer: String
  /// The AK's TPM Name, lowercase hex.
  public var attestationKeyName: String
  /// SHA-256 of the AK's SubjectPublicKeyInfo, lowercase hex.
  public var attestationKeyFingerprint: String
  /// The serial of the AK certificate the RA issued.
  public var attestationKeyCertificateSerial: String
  /// When the AK was activated.
  public var activated: Date

  /// A record of a device's TPM.
  public init(
    device: String, endorsementKeyFingerprint: String, endorsementKeyIssuer: String, attestationKeyName: String,
    attestationKeyFingerprint: String, attestationKeyCertificateSerial: String, activated: Date
  ) {
    self.device = device
    self.endorsementKeyFingerprint = endorsementKeyFingerprint
    self.endorsementKeyIssuer = endorsementKeyIssuer
    self.attestationKeyName = attestationKeyName
    self.attestationKeyFingerprint = attestationKeyFingerprint
    self.attestationKeyCertificateSerial = attestationKeyCertificateSerial
    self.activated = activated
  }
}
