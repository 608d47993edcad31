import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// The device's attestation state in its credential store: the attestation key (a TSS2 PRIVATE
/// KEY file, `attestation-key.pem`, made once) and the certificate the RA issued for it after
/// credential activation (`attestation-key.crt`). There is never more than one AK: one that the
/// TPM can no longer load (the TPM was cleared) is replaced, not kept beside a new one.
extension CredentialStore {
  /// The attestation key's TSS2 PRIVATE KEY file.
  public var attestationKeyPath: String { "\(directory)/attestation-key.pem" }
  /// The attestation key's certificate from the RA.
  public var attestationCertificatePath: String { "\(directory)/attestation-key.crt" }

  /// The attestation key file, if one was made.
  public func attestationKey() throws(EnrollmentError) -> TSS2PrivateKey? {
    guard let text = try readText(attestationKeyPath) else { return nil }
    do { return try TSS2PrivateKey(pem: text) } catch {
      throw EnrollmentError(.storage, "\(attestationKeyPath): \(error.reason)")
    }
  }

  /// The AK certificate chain (AK first), empty before activation.
  public func attestationCertificates() throws(EnrollmentError) -> [Certificate] {
    guard let text = try readText(attestationCertificatePath), text.contains("-----BEGIN CERTIFICATE-----") else {
      return []
    }
    do { return try Certificate.chain(pem: text) } catch {
      throw EnrollmentError(.storage, "\(attestationCertificatePath): \(error.reason)")
    }
  }

  func saveAttestationKey(_ key: TSS2PrivateKey) throws(EnrollmentError) {
    try writeText(key.pem, to: attestationKeyPath)
  }

  func saveAttestationCertificates(_ chain: [Certificate]) throws(EnrollmentError) {
    try writeText(chain.map(\.pem).joined(), to: attestationCertificatePath)
  }

  func removeAttestationCertificates() throws(EnrollmentError) {
    if unlink(attestationCertificatePath) != 0 && errno != ENOENT {
      throw EnrollmentError(.storage, "remove \(attestationCertificatePath): \(String(cString: strerror(errno)))")
    }
  }
}

/// Where a device stands with attestation (for `tpm info`, `doctor`, `status --json`).
public struct AttestationStatus: Sendable, Equatable {
  /// An attestation key file exists.
  public var hasAttestationKey: Bool
  /// The RA certified it (credential activation done); nil before.
  public var certificate: TLSError.CertificateSummary?
  /// The AK certificate is within its validity period.
  public var certificateValid: Bool

  /// "none", "key made, not activated", "activated", "certificate expired".
  public var state: String {
    if certificate != nil { return certificateValid ? "activated" : "certificate expired" }
    return hasAttestationKey ? "key made, not activated" : "none"
  }

  /// The attestation state of `store` at `date` (reads files only: no TPM command).
  public static func read(_ store: CredentialStore, at date: Date = Date()) -> AttestationStatus {
    let key = (try? store.attestationKey()) ?? nil
    let chain = (try? store.attestationCertificates()) ?? []
    return AttestationStatus(
      hasAttestationKey: key != nil, certificate: chain.first?.summary,
      certificateValid: chain.first?.isValid(at: date) ?? false)
  }
}

/// The device's steps of the TCG DevID flow, over EST: the attestation key made once and
/// activated with the RA (steps 1–3), and evidence for every new key (step 4).
package enum DeviceAttestation {
  /// Makes sure the device has an attestation key the RA certified: makes the AK if there is
  /// none (or the TPM can no longer load the one stored), reads the EK certificate, asks the RA
  /// for a credential challenge, releases the credential with TPM2_ActivateCredential and
  /// stores the AK certificate. Each step is saved before the next, so a run cut short resumes
  /// with the same AK. Returns the AK certificate chain.
  package static func activate(
    tpm: TPM, store: CredentialStore, client: ESTClient, authentication: ESTAuthentication,
    onEvent: (String) -> Void = { _ in }
  ) throws(EnrollmentError) -> [Certificate] {
    let file = try store.attestationKey()
    if let existing = file {
      let chain = try store.attestationCertificates()
      if let first = chain.first, first.isValid(), first.publicKeyDER == (try? existing.publicKey().spki) {
        return chain
      }
    }
    var loaded: AttestationKey? = nil
    if let existing = file {
      do {
        let key = try tpm.loadAttestationKey(existing)
        try key.load()
        loaded = key
      } catch  where error.meansKeyLost || error.code == .invalidArgument {
        onEvent("the stored attestation key cannot be loaded (\(error.reason)); making a new one")
      } catch {
        throw EnrollmentError(.tpm, "loading the attestation key: \(error)", tpm: error)
      }
    }
    let ak: AttestationKey
    if let loaded {
      ak = loaded
    } else {
      let made: TSS2PrivateKey
      do { made = try tpm.createAttestationKey() } catch {
        throw EnrollmentError(.tpm, "creating the attestation key: \(error)", tpm: error)
      }
      // Saved before the RA hears of it: a run cut short resumes with this AK, never a second.
      try store.saveAttestationKey(made)
      try store.removeAttestationCertificates()
      do { ak = try tpm.loadAttestationKey(made) } catch {
        throw EnrollmentError(.tpm, "opening the attestation key: \(error)", tpm: error)
      }
      onEvent("attestation key created")
    }
    // The EK certificate: RSA first (what most TPMs carry), then ECC.
    var ekCertificate: [UInt8]? = nil
    for type in EndorsementKeyType.allCases {
      do { ekCertificate = try tpm.endorsementCertificate(type) } catch {
        throw EnrollmentError(.tpm, "reading the EK certificate: \(error)", tpm: error)
      }
      if ekCertificate != nil { break }
    }
    guard let ekCertificate else {
      throw EnrollmentError(
        .configuration, "this TPM has no endorsement key certificate at 0x01C00002 or 0x01C0000A: it cannot be attested"
      )
    }
    let challenge = try client.activationChallenge(
      endorsementCertificate: ekCertificate, attestationKey: ak.publicKey, authentication: authentication)
    let credential: [UInt8]
    do { credential = try ak.activateCredential(challenge.challenge, endorsementKey: challenge.endorsementKey) } catch {
      throw EnrollmentError(.tpm, "activating the RA's credential: \(error)", tpm: error)
    }
    let chain = try client.attestationKeyCertificate(
      challengeID: challenge.id, credential: credential, attestationKey: ak.publicKey, authentication: authentication)
    try store.saveAttestationCertificates(chain)
    onEvent("attestation key activated: \(chain[0].subject), serial \(chain[0].serialNumber)")
    return chain
  }

  /// Step 4: TPM2_Certify of `key` by `attestationKey` over a fresh nonce from the RA, with the
  /// AK's certificate chain.
  package static func evidence(
    for key: TPMKey, by attestationKey: AttestationKey, chain: [Certificate], client: ESTClient,
    authentication: ESTAuthentication
  ) throws(EnrollmentError) -> KeyAttestation {
    let nonce = try client.attestationNonce(authentication: authentication)
    do {
      let evidence = try key.certify(by: attestationKey, qualifyingData: nonce)
      return KeyAttestation(evidence: evidence, certificates: chain.map(\.der))
    } catch {
      throw EnrollmentError(.tpm, "certifying the new key with the attestation key: \(error)", tpm: error)
    }
  }
}
