import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

/// The RA's half of attestation, besides EST's simpleenroll:
///
/// - `POST /.well-known/est/nonce`: a fresh nonce for TPM2_Certify (32 random bytes, single
///   use, bound to the credential that asked, `nonceLifetime`). Its own authenticated POST rather
///   than `csrattrs`, which RFC 7030 lets a server answer without authentication and a proxy
///   cache: a nonce must be unpredictable, used once and bound to whoever asked (the approach of
///   draft-ietf-lamps-attestation-freshness for EST).
/// - `POST /.well-known/est/attest-activate` with `{"ekCertificate", "attestationKey"}`
///   (base64 DER, base64 TPM2B_PUBLIC): checks the EK certificate against the manufacturer CAs,
///   the AK's attributes, the EK's binding in the registry, and answers a credential challenge
///   (TPM2_MakeCredential for the AK's Name and the EK) as `{"id", "credentialBlob",
///   "encryptedSecret", "endorsementKey"}`.
/// - `POST /.well-known/est/attest-akcert` with `{"id", "credential"}`: the credential the TPM
///   released proves the AK is in that TPM; the RA issues the AK certificate and records
///   EK ↔ AK ↔ device, answering the certificate chain as PEM.
///
/// Every refusal is a 403 (401 for a missing or wrong credential) with its reason, logged.
package final class AttestationService: @unchecked Sendable {
  // @unchecked: `nonces` and `pending` are guarded by `lock`.
  package let policy: AttestationPolicy
  private let ca: CertificateAuthority
  private let registry: DeviceRegistry
  private let logger: Logger
  private let lock = Lock()
  private var nonces: [[UInt8]: (owner: String, expires: ContinuousClock.Instant)] = [:]
  private var pending: [String: Pending] = [:]

  private struct Pending {
    var device: String
    var owner: String
    var credential: [UInt8]
    var endorsementKeyFingerprint: String
    var endorsementKeyIssuer: String
    var attestationKey: PublicKey
    var expires: ContinuousClock.Instant
  }

  /// At most this many nonces or challenges are outstanding; older ones are dropped first.
  static let outstandingLimit = 10_000

  package init(policy: AttestationPolicy, ca: CertificateAuthority, registry: DeviceRegistry, logger: Logger) {
    self.policy = policy
    self.ca = ca
    self.registry = registry
    self.logger = logger
  }

  // MARK: - Nonces

  package func issueNonce(owner: String) -> [UInt8] {
    let nonce = (try? CredentialProtection.randomBytes(32)) ?? []
    // In-memory lifetimes run on the monotonic clock: an NTP step neither kills nor extends them.
    let now = ContinuousClock.now
    lock.withLock {
      if nonces.count >= Self.outstandingLimit { nonces = nonces.filter { $0.value.expires > now } }
      if nonces.count >= Self.outstandingLimit, let oldest = nonces.min(by: { $0.value.expires < $1.value.expires }) {
        nonces[oldest.key] = nil
      }
      nonces[nonce] = (owner, now.advanced(by: policy.nonceLifetime))
    }
    return nonce
  }

  /// Uses up a nonce: nil when it was ours, unused, current and given to `owner`; else why not.
  package func consumeNonce(_ nonce: [UInt8], owner: String) -> String? {
    let entry = lock.withLock { nonces.removeValue(forKey: nonce) }
    guard let entry else {
      return "the evidence's nonce is not one this RA gave out, or it was used already (a replay?)"
    }
    guard entry.expires > ContinuousClock.now else {
      return "the evidence's nonce expired (it lives \(policy.nonceLifetime.secondsText))"
    }
    guard entry.owner == owner else { return "the evidence's nonce was given to another credential" }
    return nil
  }

  // MARK: - Endpoints

  package func nonceResponse(owner: String) -> HTTPResponse {
    let nonce = issueNonce(owner: owner)
    return Self.json(["nonce": Base64.encode(nonce), "expiresIn": Int(policy.nonceLifetime.seconds)])
  }

  private struct ActivationRequest: Decodable {
    var ekCertificate: String
    var attestationKey: String
  }

  private struct CredentialAnswer: Decodable {
    var id: String
    var credential: String
  }

  package func activate(_ body: [UInt8], device: String, owner: String, source: String) -> HTTPResponse {
    guard let request = try? JSONDecoder().decode(ActivationRequest.self, from: Data(body)),
      let ekDER = Base64.decode(request.ekCertificate), let akBlob = Base64.decode(request.attestationKey)
    else {
      return .text(
        400, "the body must be JSON {\"ekCertificate\": base64 DER, \"attestationKey\": base64 TPM2B_PUBLIC}")
    }
    func refuse(_ reason: String) -> HTTPResponse { refusal("attest-activate", reason, device: device, source: source) }
    let ek: Certificate
    do { ek = try Certificate(der: ekDER) } catch { return refuse("the EK certificate: \(error.reason)") }
    do {
      _ = try Certificate.verifiedChain(
        leaf: ek, untrusted: [], anchors: policy.manufacturerCAs, purpose: .any, partialChain: true)
    } catch {
      return refuse("the EK certificate (issuer \(ek.issuer)) is not from a known TPM manufacturer: \(error.reason)")
    }
    let ak: PublicKey
    do { ak = try PublicKey(marshaledPublic: akBlob) } catch {
      return refuse("the attestation key is not a TPM2B_PUBLIC")
    }
    let required: ObjectAttributes = [.fixedTPM, .fixedParent, .sensitiveDataOrigin, .restricted, .sign]
    guard ak.attributes.isSuperset(of: required), !ak.attributes.contains(.decrypt) else {
      return refuse("the attestation key is not a restricted signing key fixed to its TPM [\(ak.attributes)]")
    }
    let ekFingerprint = Certificate.sha256Hex(ek.publicKeyDER)
    let bound: AttestationRecord?
    do {
      bound = try registry.storage.read { t throws(RegistryError) in try t.attestation(endorsementKey: ekFingerprint) }
    } catch {
      return .text(500, "the registry cannot be read: \(error)")
    }
    if let bound, bound.device != device {
      return refuse(
        "this TPM's endorsement key is registered to device \(JSON.string(bound.device)): one TPM is one device (a clone?)"
      )
    }
    let credential: [UInt8]
    let challenge: CredentialChallenge
    do {
      credential = try CredentialProtection.randomBytes(32)
      challenge = try CredentialProtection.makeCredential(
        credential: credential, objectName: ak.name, endorsementKeySPKI: ek.publicKeyDER)
    } catch {
      return refuse("no credential can be made for this EK: \(error)")
    }
    let id = (try? CredentialProtection.randomBytes(16))?.map { String(format: "%02x", $0) }.joined() ?? ""
    let now = ContinuousClock.now
    lock.withLock {
      if pending.count >= Self.outstandingLimit { pending = pending.filter { $0.value.expires > now } }
      pending[id] = Pending(
        device: device, owner: owner, credential: credential, endorsementKeyFingerprint: ekFingerprint,
        endorsementKeyIssuer: ek.issuer, attestationKey: ak,
        expires: now.advanced(by: policy.activationLifetime))
    }
    logger.info(
      "attest-activate for \(device) from \(source): challenge \(id) for EK sha256:\(ekFingerprint.prefix(16))…")
    return Self.json([
      "id": id, "credentialBlob": Base64.encode(challenge.credentialBlob),
      "encryptedSecret": Base64.encode(challenge.encryptedSecret),
      "endorsementKey": ek.keyType.hasPrefix("RSA")
        ? EndorsementKeyType.rsa2048.rawValue : EndorsementKeyType.eccP256.rawValue,
    ])
  }

  package func certifyAttestationKey(_ body: [UInt8], device: String, owner: String, source: String) -> HTTPResponse {
    guard let answer = try? JSONDecoder().decode(CredentialAnswer.self, from: Data(body)),
      let credential = Base64.decode(answer.credential)
    else {
      return .text(400, "the body must be JSON {\"id\": challenge id, \"credential\": base64}")
    }
    // Single use: taken out before it is checked.
    let entry = lock.withLock { pending.removeValue(forKey: answer.id) }
    func refuse(_ reason: String) -> HTTPResponse { refusal("attest-akcert", reason, device: device, source: source) }
    guard let entry else { return refuse("no such credential challenge, or it was answered already") }
    guard entry.expires > ContinuousClock.now else { return refuse("the credential challenge expired") }
    guard entry.device == device, entry.owner == owner else {
      return refuse("the credential challenge was given to another credential")
    }
    guard ESTService.constantTimeEqual(credential, entry.credential) else {
      return refuse("the credential is wrong: the attestation key is not in the TPM of that EK")
    }
    let akFingerprint = Certificate.sha256Hex(entry.attestationKey.spki)
    let outcome: Result<Certificate, Refusal>
    do {
      outcome = try registry.bindAttestationKey(
        device: device, endorsementKeyFingerprint: entry.endorsementKeyFingerprint,
        endorsementKeyIssuer: entry.endorsementKeyIssuer,
        attestationKeyName: entry.attestationKey.name.map { String(format: "%02x", $0) }.joined(),
        attestationKeyFingerprint: akFingerprint, source: source
      ) { () throws(RAError) -> Certificate in
        try ca.issueAttestationKeyCertificate(
          publicKeySPKI: entry.attestationKey.spki, device: device,
          lifetime: policy.attestationKeyCertificateLifetime, backdate: .seconds(60))
      }
    } catch {
      return .text(500, "the registry cannot be written: \(error)")
    }
    switch outcome {
    case .failure(let refusal):
      logger.info("refused attest-akcert for \(device) from \(source): \(refusal.reason)")
      return .text(refusal.status, refusal.reason)
    case .success(let certificate):
      logger.info(
        "attestation key of \(device) activated: AK certificate \(certificate.serialNumber), EK from \(entry.endorsementKeyIssuer)"
      )
      let chain = [certificate] + ca.chain.filter { $0.subject != $0.issuer }
      return HTTPResponse(
        status: 200, headers: [("Content-Type", "application/pem-certificate-chain")],
        body: Array(chain.map(\.pem).joined().utf8))
    }
  }

  /// A 403 with its reason, logged and in the device's audit trail.
  private func refusal(_ operation: String, _ reason: String, device: String, source: String) -> HTTPResponse {
    logger.info("refused \(operation) for \(device) from \(source): \(reason)")
    try? registry.storage.write { t throws(RegistryError) in
      try t.append(AuditEntry(time: Date(), device: device, event: "refused", detail: reason, source: source))
    }
    return .text(403, reason)
  }

  static func json(_ object: [String: Any]) -> HTTPResponse {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data()
    return HTTPResponse(status: 200, headers: [("Content-Type", "application/json")], body: Array(data))
  }
}
