internal import CEdgeKeyProvider
internal import CTSS2

/// An attestation key, opened for TPM2_Certify and credential activation: a restricted signing
/// key signs only what the TPM itself produced, never a digest handed to it, so this type has
/// no `sign`. Made once with ``TPM/createAttestationKey()`` and kept with the device's state.
///
/// The key is loaded on first use and stays loaded, as a ``TPMKey`` does (and is loaded again
/// if the TPM lost it). Thread-safe.
public final class AttestationKey: @unchecked Sendable {
  // @unchecked: the C key is only touched under the TPM's lock (edgekey_tpm_key_* take it).
  package let raw: OpaquePointer
  /// The TPM this key lives in.
  public let tpm: TPM
  /// The public half (its attributes say restricted, sign, fixedTPM, fixedParent).
  public let publicKey: PublicKey

  init(raw: OpaquePointer, tpm: TPM) throws(TPMError) {
    self.raw = raw
    self.tpm = tpm
    do {
      self.publicKey = try PublicKey(edgekey_tpm_key_public(raw).pointee)
    } catch {
      edgekey_tpm_key_free(raw)
      throw error
    }
  }

  deinit {
    edgekey_tpm_key_free(raw)
  }

  /// Loads the key now rather than at first use (SRK + TPM2_Load). Throws with
  /// ``TPMError/meansKeyLost`` when this TPM can no longer load it (cleared, or another TPM).
  public func load() throws(TPMError) {
    try check("loading the attestation key") { edgekey_tpm_key_load(raw, $0) }
  }

  /// The key's TPM Name (nameAlg || H(TPMT_PUBLIC)): what a credential is made for.
  public var name: [UInt8] { publicKey.name }

  /// TPM2_ActivateCredential: recovers the secret a verifier sealed to this key's Name and the
  /// TPM's endorsement key with TPM2_MakeCredential (TPM 2.0 Part 1, "Credential Protection").
  /// The TPM releases it only when the AK it names is loaded in the same TPM as that EK, which
  /// is what proves the AK is in the TPM the EK certificate is for.
  ///
  /// Costs the EK's TPM2_CreatePrimary (RSA 2048 takes up to seconds on a real chip), a policy
  /// session with TPM2_PolicySecret(endorsement) (the EK's policy), TPM2_ActivateCredential and
  /// the flushes. Throws ``TPMError/Code/credentialRejected`` when the challenge was not made
  /// for this AK and EK (TPM_RC_INTEGRITY, or TPM_RC_VALUE for a secret not sealed to this EK).
  public func activateCredential(_ challenge: CredentialChallenge, endorsementKey type: EndorsementKeyType)
    throws(TPMError) -> [UInt8]
  {
    var blob = TPM2B_ID_OBJECT()
    var secret = TPM2B_ENCRYPTED_SECRET()
    try unmarshal(challenge.credentialBlob, into: &blob, Tss2_MU_TPM2B_ID_OBJECT_Unmarshal)
    try unmarshal(challenge.encryptedSecret, into: &secret, Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal)
    return try tpm.withESYS { ctx throws(TPMError) -> [UInt8] in
      var ak = ESYS_TR(ESYS_TR_NONE)
      try check("loading the attestation key") { edgekey_tpm_key_load_locked(raw, ctx, &ak, $0) }
      let ek = try tpm.createEndorsementKey(ctx, type).handle
      defer { Esys_FlushContext(ctx, ek) }

      var session = ESYS_TR(ESYS_TR_NONE)
      var symmetric = TPMT_SYM_DEF()
      symmetric.algorithm = TPM2_ALG_NULL
      try esys(
        "TPM2_StartAuthSession", "starting the EK's policy session",
        Esys_StartAuthSession(
          ctx, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE),
          ESYS_TR(ESYS_TR_NONE), nil, TPM2_SE_POLICY, &symmetric, TPM2_ALG_SHA256, &session))
      // Flushed by the TPM when ActivateCredential succeeds without continueSession; flushed
      // here in every other case (an error for an already-gone session is of no interest).
      var sessionAlive = true
      defer { if sessionAlive { Esys_FlushContext(ctx, session) } }
      var nonce = TPM2B_NONCE()
      var cpHash = TPM2B_DIGEST()
      var policyRef = TPM2B_NONCE()
      var timeout: UnsafeMutablePointer<TPM2B_TIMEOUT>? = nil
      var ticket: UnsafeMutablePointer<TPMT_TK_AUTH>? = nil
      defer {
        esysFree(timeout)
        esysFree(ticket)
      }
      // The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT): the endorsement hierarchy's
      // auth (empty on a device) satisfies it.
      try esys(
        "TPM2_PolicySecret", "satisfying the EK's policy",
        Esys_PolicySecret(
          ctx, ESYS_TR(ESYS_TR_RH_ENDORSEMENT), session, ESYS_TR(ESYS_TR_PASSWORD), ESYS_TR(ESYS_TR_NONE),
          ESYS_TR(ESYS_TR_NONE), &nonce, &cpHash, &policyRef, 0, &timeout, &ticket))
      var certInfo: UnsafeMutablePointer<TPM2B_DIGEST>? = nil
      defer { esysFree(certInfo) }
      let rc = Esys_ActivateCredential(
        ctx, ak, ek, ESYS_TR(ESYS_TR_PASSWORD), session, ESYS_TR(ESYS_TR_NONE), &blob, &secret, &certInfo)
      if rc == 0 { sessionAlive = false }
      let base = ResponseCode(rawValue: rc).base
      if base == .integrity || base == .value || base == .size {
        throw TPMError(
          .credentialRejected, responseCode: ResponseCode(rawValue: rc), command: "TPM2_ActivateCredential",
          reason: "the TPM refused the credential: it was not made for this attestation key and this TPM's "
            + "\(type.rawValue) endorsement key, or it was altered")
      }
      try esys("TPM2_ActivateCredential", "activating the credential", rc)
      let digest = certInfo!.pointee
      return withUnsafeBytes(of: digest.buffer) { Array($0.prefix(Int(digest.size))) }
    }
  }
}

/// What TPM2_MakeCredential gives a verifier to send to the device: the credential wrapped
/// for one AK Name (integrity HMAC and AES-CFB), and the seed that unwraps it, encrypted to
/// the TPM's endorsement key.
public struct CredentialChallenge: Sendable, Equatable {
  /// Marshaled TPM2B_ID_OBJECT.
  public var credentialBlob: [UInt8]
  /// Marshaled TPM2B_ENCRYPTED_SECRET.
  public var encryptedSecret: [UInt8]

  /// A challenge of TPM2_MakeCredential's two outputs.
  public init(credentialBlob: [UInt8], encryptedSecret: [UInt8]) {
    self.credentialBlob = credentialBlob
    self.encryptedSecret = encryptedSecret
  }
}

/// What TPM2_Certify says of a key: the TPM's signed statement (TPMS_ATTEST) that an object
/// with this Name is loaded in it, the attestation key's signature over it, and the key's
/// public area (whose hash is that Name). A verifier needs nothing else but the AK's public key.
public struct CertifyEvidence: Sendable, Equatable {
  /// TPMS_ATTEST, exactly the bytes the AK signed.
  public var attest: [UInt8]
  /// Marshaled TPMT_SIGNATURE.
  public var signature: [UInt8]
  /// Marshaled TPMT_PUBLIC of the certified key (no size prefix).
  public var certifiedPublicArea: [UInt8]

  /// Evidence of TPM2_Certify's outputs and the certified key's public area.
  public init(attest: [UInt8], signature: [UInt8], certifiedPublicArea: [UInt8]) {
    self.attest = attest
    self.signature = signature
    self.certifiedPublicArea = certifiedPublicArea
  }
}

extension TPM {
  /// Opens an attestation key file (from ``createAttestationKey()``, or tpm2-tools') for
  /// TPM2_Certify and activation. Throws ``TPMError/Code/invalidArgument`` for a key that is not
  /// a restricted signing key. No TPM traffic until the first use.
  public func loadAttestationKey(_ file: TSS2PrivateKey) throws(TPMError) -> AttestationKey {
    var key: OpaquePointer? = nil
    let rc = file.publicBlob.withUnsafeBufferPointer { pub in
      file.privateBlob.withUnsafeBufferPointer { priv in
        edgekey_tpm_attestation_key_from_blobs(
          raw, file.parent, pub.baseAddress, pub.count, priv.baseAddress, priv.count, &key)
      }
    }
    guard rc == 0, let key else {
      throw TPMError(responseCode: rc, command: nil, context: "opening the attestation key file")
    }
    return try AttestationKey(raw: key, tpm: self)
  }
}

extension TPMKey {
  /// TPM2_Certify of this key by `attestationKey` over `qualifyingData` (the verifier's fresh
  /// nonce, at most 64 bytes). One TPM2_Certify when both keys are loaded (each is loaded on its
  /// first use and stays loaded). Both keys must live in the same TPM.
  public func certify(by attestationKey: AttestationKey, qualifyingData: [UInt8]) throws(TPMError)
    -> CertifyEvidence
  {
    guard attestationKey.tpm === tpm else {
      throw TPMError(.invalidArgument, reason: "the attestation key is in another TPM context")
    }
    guard qualifyingData.count <= 64 else {
      throw TPMError(.invalidArgument, reason: "qualifying data is at most 64 bytes, got \(qualifyingData.count)")
    }
    var attest = TPM2B_ATTEST()
    var signature = TPMT_SIGNATURE()
    try check("certifying the key") { command in
      qualifyingData.withUnsafeBufferPointer { q in
        edgekey_tpm_key_certify(raw, attestationKey.raw, q.baseAddress, q.count, &attest, &signature, command)
      }
    }
    return CertifyEvidence(
      attest: withUnsafeBytes(of: attest.attestationData) { Array($0.prefix(Int(attest.size))) },
      signature: try marshal(signature, Tss2_MU_TPMT_SIGNATURE_Marshal),
      certifiedPublicArea: publicKey.publicArea)
  }
}
