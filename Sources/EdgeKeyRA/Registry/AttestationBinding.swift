import EdgeKeyCore
import EdgeKeyTLS
import Foundation

extension DeviceRegistry {
  /// The device a credential speaks for, for the attestation endpoints (nonce, activation):
  /// its one-time secret (used or not: a device asks again after a lost answer), its registered
  /// bootstrap certificate, or a current certificate issued to it. A shared password speaks for
  /// no device, so it cannot activate an attestation key.
  package func authenticate(_ claim: EnrolmentClaim) throws(RegistryError) -> Result<String, Refusal> {
    try storage.read { t throws(RegistryError) -> Result<String, Refusal> in
      let device: DeviceRecord
      switch claim {
      case .secret(let id, let secret):
        guard let d = try t.device(id), d.method == .oneTimeSecret, let verifier = try t.secretVerifier(of: id),
          SecretVerifier.verify(secret, against: verifier)
        else { return .failure(Refusal(401, "unknown device or wrong secret")) }
        device = d
      case .bootstrap(let certificate):
        guard let d = try t.device(bootstrapFingerprint: certificate.fingerprint) else {
          return .failure(
            Refusal(
              403,
              "the bootstrap certificate \(certificate.subject) is not registered to a device: attestation needs a device in the registry"
            ))
        }
        device = d
      case .renewal(let certificate):
        guard let record = try t.certificate(serial: certificate.serialNumber), record.revoked == nil,
          let d = try t.device(record.device)
        else {
          return .failure(
            Refusal(403, "the certificate \(certificate.serialNumber) is not a current one of this registry"))
        }
        device = d
      case .sharedPassword:
        return .failure(
          Refusal(403, "a shared password speaks for no device: attestation needs a one-time secret or a certificate"))
      }
      guard device.state == .active else {
        return .failure(Refusal(403, "device \(JSON.string(device.id)) is \(device.state.rawValue)", device: device.id))
      }
      return .success(device.id)
    }
  }

  /// What the registry holds of a device's TPM.
  public func attestation(of device: String) throws(RegistryError) -> AttestationRecord? {
    try storage.read { t throws(RegistryError) in try t.attestation(of: device) }
  }

  /// Whether a device's keys must be attested (an operator asked, or it has an activated AK).
  package func attestationRequired(of device: String) throws(RegistryError) -> Bool {
    try storage.read { t throws(RegistryError) -> Bool in
      if try t.attestationRequired(of: device) { return true }
      return try t.attestation(of: device) != nil
    }
  }

  /// Requires attestation for a device from now on.
  public func requireAttestation(of device: String, source: String = "admin") throws(RegistryError) {
    try storage.write { t throws(RegistryError) in
      guard try t.device(device) != nil else {
        throw RegistryError(.notFound, "no device \(JSON.string(device))")
      }
      try t.requireAttestation(of: device)
      try t.append(
        AuditEntry(time: Date(), device: device, event: "attestation required", detail: "", source: source))
    }
  }

  /// Forgets a device's TPM (its TPM was replaced): the next activation binds the new one.
  public func forgetTPM(of device: String, source: String = "admin") throws(RegistryError) {
    try storage.write { t throws(RegistryError) in
      guard let bound = try t.attestation(of: device) else {
        throw RegistryError(.notFound, "device \(JSON.string(device)) has no TPM on record")
      }
      try t.removeAttestation(of: device)
      try t.append(
        AuditEntry(
          time: Date(), device: device, event: "TPM forgotten",
          detail:
            "EK sha256:\(bound.endorsementKeyFingerprint), AK certificate \(bound.attestationKeyCertificateSerial)",
          source: source))
    }
  }

  /// Checks that an endorsement key may be bound to `device` (it is no other device's, and the
  /// device has no other), then issues the AK certificate with `sign` and records the binding,
  /// in one transaction.
  package func bindAttestationKey(
    device: String, endorsementKeyFingerprint: String, endorsementKeyIssuer: String, attestationKeyName: String,
    attestationKeyFingerprint: String, source: String, sign: () throws(RAError) -> Certificate
  ) throws(RegistryError) -> Result<Certificate, Refusal> {
    let outcome = try storage.write { t throws(RegistryError) -> Result<Certificate, Refusal> in
      if let other = try t.attestation(endorsementKey: endorsementKeyFingerprint), other.device != device {
        return .failure(
          Refusal(
            403,
            "this TPM's endorsement key is registered to device \(JSON.string(other.device)): one TPM is one device (a clone?)",
            device: device))
      }
      if let bound = try t.attestation(of: device), bound.endorsementKeyFingerprint != endorsementKeyFingerprint {
        return .failure(
          Refusal(
            403,
            "device \(JSON.string(device)) is bound to another TPM (EK sha256:\(bound.endorsementKeyFingerprint.prefix(16))…); if its TPM was replaced, an operator runs admin forget-tpm",
            device: device))
      }
      let certificate: Certificate
      do { certificate = try sign() } catch {
        return .failure(Refusal(500, "cannot issue the attestation key certificate: \(error)", device: device))
      }
      let now = Date()
      try t.setAttestation(
        AttestationRecord(
          device: device, endorsementKeyFingerprint: endorsementKeyFingerprint,
          endorsementKeyIssuer: endorsementKeyIssuer, attestationKeyName: attestationKeyName,
          attestationKeyFingerprint: attestationKeyFingerprint,
          attestationKeyCertificateSerial: certificate.serialNumber, activated: now))
      try t.append(
        AuditEntry(
          time: now, device: device, event: "attestation key activated",
          detail:
            "AK certificate \(certificate.serialNumber), AK name \(attestationKeyName.prefix(20))…, EK sha256:\(endorsementKeyFingerprint) from \(endorsementKeyIssuer)",
          source: source))
      return .success(certificate)
    }
    if case .failure(let refusal) = outcome, refusal.status != 500 {
      try? storage.write { t throws(RegistryError) in
        try t.append(
          AuditEntry(time: Date(), device: refusal.device, event: "refused", detail: refusal.reason, source: source))
      }
    }
    return outcome
  }
}
