import EdgeKeyCore
import EdgeKeyTLS
import Foundation

/// What a request presented to be issued a certificate.
package enum EnrolmentClaim: Sendable {
  /// HTTP Basic: the device id as user name, its one-time secret as password.
  case secret(device: String, secret: String)
  /// A client certificate from a bootstrap CA (verified by the TLS layer).
  case bootstrap(Certificate)
  /// The shared factory password (only with a shared-password pattern).
  case sharedPassword(user: String)
  /// Re-enrollment with the current certificate (verified by the TLS layer, issued here).
  case renewal(Certificate)

  /// The key rate limits count this claim under.
  var rateKey: String {
    switch self {
    case .secret(let device, _): "device \(device)"
    case .bootstrap(let c): "bootstrap \(c.fingerprint)"
    case .sharedPassword(let user): "shared \(user)"
    case .renewal(let c): "certificate \(c.serialNumber)"
    }
  }
}

/// A request the policy refuses: the HTTP status and the reason sent to the client and logged.
package struct Refusal: Error, Sendable {
  package var status: Int
  package var reason: String
  /// The device concerned, when known (for the audit trail).
  package var device: String?
  init(_ status: Int, _ reason: String, device: String? = nil) {
    self.status = status
    self.reason = reason
    self.device = device
  }
}

/// The outcome of `DeviceRegistry.issue`.
package enum IssuanceOutcome {
  case issued(Certificate, device: String)
  case refused(Refusal)
}

extension DeviceRegistry {
  /// Decides a request and, when the policy allows it, signs and records the certificate in
  /// one durable transaction. Nothing is written for a refusal but its audit line; a
  /// certificate that cannot be recorded is never returned.
  ///
  /// With `attestation` (evidence the caller verified), the AK that signed it must be the one
  /// the device activated; without it, a device whose keys must be attested (`requireAttestation`
  /// for all, an operator's requirement, or an activated AK) is refused.
  package func issue(
    _ claim: EnrolmentClaim, csr: CertificateSigningRequest, naming: NamingPolicy, operation: String, source: String,
    attestation: VerifiedKeyAttestation? = nil, requireAttestation: Bool = false,
    sign: (DeviceRecord) throws(RAError) -> Certificate
  ) throws(RegistryError) -> IssuanceOutcome {
    let outcome = try storage.write { t throws(RegistryError) -> IssuanceOutcome in
      var naming = naming
      naming.reserved += try t.reserved()
      let decided: (device: DeviceRecord, isNew: Bool, supersede: [CertificateRecord], event: String)
      switch try Self.decide(claim, csr: csr, naming: naming, in: t) {
      case .failure(let refusal): return .refused(refusal)
      case .success(let d): decided = d
      }
      let id = decided.device.id
      let bound = decided.isNew ? nil : try t.attestation(of: id)
      let operatorRequires = decided.isNew ? false : try t.attestationRequired(of: id)
      if let attestation {
        guard let bound else {
          return .refused(
            Refusal(
              403,
              "device \(JSON.string(id)) has no activated attestation key: the evidence's AK (\(attestation.attestationKeyCertificate.subject)) is not its",
              device: id))
        }
        guard bound.attestationKeyFingerprint == attestation.attestationKeyFingerprint else {
          return .refused(
            Refusal(
              403,
              "the evidence is signed by another device's attestation key (\(attestation.attestationKeyCertificate.subject)), not device \(JSON.string(id))'s",
              device: id))
        }
      } else if requireAttestation || bound != nil || operatorRequires {
        let why =
          requireAttestation
          ? "this RA requires attestation"
          : bound != nil ? "it has an activated attestation key" : "an operator requires it"
        return .refused(
          Refusal(
            403,
            "device \(JSON.string(id)) must prove its key is in its TPM (\(why)): the request carries no key attestation",
            device: id))
      }
      let certificate: Certificate
      do { certificate = try sign(decided.device) } catch {
        return .refused(Refusal(500, "cannot issue: \(error)", device: decided.device.id))
      }
      let now = Date()
      if decided.isNew {
        do throws(RegistryError) { try t.insert(decided.device, secretVerifier: nil) } catch
          where error.kind == .conflict
        {
          return .refused(Refusal(403, error.message, device: decided.device.id))
        }
      }
      for old in decided.supersede {
        try t.revoke(serial: old.serial, at: now, reason: .superseded)
        _ = try t.increment("revocations")
      }
      if case .secret = claim { try t.setSecretUsed(now, of: decided.device.id) }
      try t.insert(
        CertificateRecord(
          serial: certificate.serialNumber, device: decided.device.id, subject: certificate.subject,
          notBefore: certificate.notBefore, notAfter: certificate.notAfter, fingerprint: certificate.fingerprint,
          keyFingerprint: Certificate.sha256Hex(certificate.publicKeyDER), issued: now, operation: operation))
      var detail =
        "serial \(certificate.serialNumber), \(certificate.subject), until \(Timestamp.iso8601(certificate.notAfter))"
      if let attestation {
        detail += "; key attested (TPM2_Certify by AK \(attestation.attestationKeyCertificate.serialNumber))"
      }
      if !decided.supersede.isEmpty {
        detail += "; superseded \(decided.supersede.map(\.serial).joined(separator: ", "))"
      }
      try t.append(
        AuditEntry(time: now, device: decided.device.id, event: decided.event, detail: detail, source: source))
      return .issued(certificate, device: decided.device.id)
    }
    if case .refused(let refusal) = outcome, refusal.status != 500 {
      // The refusal is kept for the operator; the request changed nothing else.
      try? storage.write { t throws(RegistryError) in
        try t.append(
          AuditEntry(time: Date(), device: refusal.device, event: "refused", detail: refusal.reason, source: source))
      }
    }
    return outcome
  }

  /// Whether one of `certificates`, not revoked, is for the request's key.
  private static func sameKey(as csr: CertificateSigningRequest, in certificates: [CertificateRecord]) -> Bool {
    let key = Certificate.sha256Hex(csr.publicKeyDER)
    return certificates.contains { $0.keyFingerprint == key && $0.revoked == nil }
  }

  private typealias Decision = (device: DeviceRecord, isNew: Bool, supersede: [CertificateRecord], event: String)

  /// The policy's answer, before anything is written.
  private static func decide(
    _ claim: EnrolmentClaim, csr: CertificateSigningRequest, naming: NamingPolicy, in t: any RegistryTransaction
  ) throws(RegistryError) -> Result<Decision, Refusal> {
    let requested = csr.subjectFields.first { $0.0 == "CN" }?.1 ?? ""
    func nameCheck(_ device: DeviceRecord) -> Refusal? {
      guard device.state == .active else {
        return Refusal(403, "device \(JSON.string(device.id)) is \(device.state.rawValue)", device: device.id)
      }
      let name = device.names.contains(requested) ? requested : device.names.first ?? ""
      if let why = naming.problem(with: csr, name: name) {
        let held = device.names.count > 1 ? " (it holds \(device.names.map(JSON.string).joined(separator: ", ")))" : ""
        return Refusal(403, "device \(JSON.string(device.id)): \(why)\(held)", device: device.id)
      }
      if let why = naming.problem(with: name) { return Refusal(403, why, device: device.id) }
      return nil
    }
    switch claim {
    case .secret(let id, let secret):
      guard let device = try t.device(id), device.method == .oneTimeSecret,
        let verifier = try t.secretVerifier(of: id), SecretVerifier.verify(secret, against: verifier)
      else {
        // Which of the three it was is the operator's to know, not the client's.
        return .failure(Refusal(401, "unknown device or wrong secret", device: try t.device(id)?.id))
      }
      let current = try t.certificates(of: id).filter { $0.revoked == nil && $0.notAfter > Date() }
      if let used = device.secretUsed {
        // The same key again is the same device asking again (its answer was lost, or its
        // certificate expired while it was off): proof of possession is the request's signature.
        guard try sameKey(as: csr, in: t.certificates(of: id)) else {
          return .failure(
            Refusal(
              403, "the one-time secret of device \(JSON.string(id)) was used on \(Timestamp.iso8601(used))", device: id
            ))
        }
        if let refusal = nameCheck(device) { return .failure(refusal) }
        return .success((device, false, [], "enrolled again with the same key"))
      }
      if let refusal = nameCheck(device) { return .failure(refusal) }
      // A re-armed secret enrols a new key: what the old one was issued is superseded.
      return .success((device, false, current, current.isEmpty ? "enrolled" : "enrolled again (secret re-armed)"))

    case .bootstrap(let certificate):
      var device: DeviceRecord
      var isNew = false
      if let known = try t.device(bootstrapFingerprint: certificate.fingerprint) {
        device = known
      } else {
        guard let cn = certificate.commonName, let name = naming.bootstrapName(commonName: cn) else {
          return .failure(
            Refusal(
              403,
              "the bootstrap certificate \(certificate.subject) (SHA-256 \(certificate.fingerprint)) is not in the registry"
            ))
        }
        if let why = ManifestEntry.idProblem(cn) { return .failure(Refusal(403, "the bootstrap CN: \(why)")) }
        if let why = naming.problem(with: name) { return .failure(Refusal(403, "the derived name: \(why)")) }
        if try t.device(cn) != nil {
          return .failure(
            Refusal(403, "device \(JSON.string(cn)) is registered with another bootstrap certificate", device: cn))
        }
        if let holder = try t.holder(of: name) {
          return .failure(Refusal(403, "the name \(JSON.string(name)) is held by device \(JSON.string(holder))"))
        }
        device = DeviceRecord(
          id: cn, names: [name], state: .active, method: .bootstrapCertificate,
          bootstrapFingerprint: certificate.fingerprint, secretUsed: nil, created: Date())
        isNew = true
      }
      if let refusal = nameCheck(device) { return .failure(refusal) }
      let current = try t.certificates(of: device.id).filter { $0.revoked == nil && $0.notAfter > Date() }
      if !current.isEmpty && !naming.reenrolAfterLoss {
        return .failure(
          Refusal(
            403,
            "device \(JSON.string(device.id)) is already enrolled; enrolling it again with its bootstrap certificate is refused by policy",
            device: device.id))
      }
      return .success((device, isNew, current, current.isEmpty ? "enrolled" : "enrolled again after loss"))

    case .sharedPassword(let user):
      guard let pattern = naming.sharedPasswordPattern else {
        return .failure(Refusal(401, "the shared password is not accepted"))
      }
      guard NamingPolicy.matches(requested, pattern: pattern) else {
        return .failure(
          Refusal(
            403,
            "the shared password of \(JSON.string(user)) enrols names matching \(pattern), not \(JSON.string(requested))"
          ))
      }
      if let why = naming.problem(with: csr, name: requested) ?? naming.problem(with: requested) {
        return .failure(Refusal(403, why))
      }
      if let holder = try t.holder(of: requested) {
        // On the shared password a name changes key only when no valid certificate holds it
        // (the device was off longer than its certificate lived), or it is the same key again.
        if let device = try t.device(holder), device.method == .sharedPassword {
          let certificates = try t.certificates(of: holder)
          let valid = certificates.filter { $0.revoked == nil && $0.notAfter > Date() }
          if sameKey(as: csr, in: certificates) || valid.isEmpty {
            if let refusal = nameCheck(device) { return .failure(refusal) }
            return .success((device, false, [], "enrolled again with the shared password"))
          }
        }
        return .failure(
          Refusal(403, "the name \(JSON.string(requested)) is held by device \(JSON.string(holder))", device: holder))
      }
      // The device's id is its name; a replacement for a retired device gets "name~2", ...
      var id = requested
      var n = 1
      while try t.device(id) != nil {
        n += 1
        id = "\(requested)~\(n)"
      }
      let device = DeviceRecord(
        id: id, names: [requested], state: .active, method: .sharedPassword, bootstrapFingerprint: nil,
        secretUsed: nil, created: Date())
      if let refusal = nameCheck(device) { return .failure(refusal) }
      return .success((device, true, [], "enrolled with the shared password"))

    case .renewal(let current):
      guard let record = try t.certificate(serial: current.serialNumber) else {
        return .failure(Refusal(403, "the certificate \(current.serialNumber) is not in the registry"))
      }
      if let revoked = record.revoked {
        return .failure(
          Refusal(
            403,
            "the certificate \(record.serial) was revoked on \(Timestamp.iso8601(revoked)) (\(record.reason?.rawValue ?? "unspecified"))",
            device: record.device))
      }
      guard let device = try t.device(record.device) else {
        return .failure(Refusal(403, "the certificate's device \(record.device) is not in the registry"))
      }
      if let refusal = nameCheck(device) { return .failure(refusal) }
      return .success((device, false, [], "renewed"))
    }
  }
}
