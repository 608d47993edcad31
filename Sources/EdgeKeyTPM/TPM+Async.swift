import EdgeKeyCore

// Every TPM operation that sends commands, for async callers. A TPM command costs about 1 ms on
// swtpm, 25–190 ms on a real chip (seconds for an RSA key or EK, up to the command timeout for
// a hung one): an async caller gets these overloads by itself, and the commands run on
// `BlockingPool`, EdgeKey's own threads, never on the cooperative pool. The synchronous forms
// are for threads of the caller's own. Each does what the synchronous form of the same name
// documents.

extension TPM {
  /// The TPM's identity and capabilities, as ``info()`` reads them, off the cooperative pool.
  public func info() async throws(TPMError) -> TPMInfo {
    try await BlockingPool.shared.run { () throws(TPMError) -> TPMInfo in try self.info() }
  }

  /// Random bytes from the TPM, as ``randomBytes(_:)`` gives them, off the cooperative pool.
  public func randomBytes(_ count: Int) async throws(TPMError) -> [UInt8] {
    try await BlockingPool.shared.run { () throws(TPMError) -> [UInt8] in try self.randomBytes(count) }
  }

  /// PCR values, as ``readPCRs(_:bank:)`` reads them, off the cooperative pool.
  public func readPCRs(_ indices: [Int] = Array(0..<24), bank: HashAlgorithm = .sha256) async throws(TPMError)
    -> [Int: [UInt8]]
  {
    try await BlockingPool.shared.run { () throws(TPMError) -> [Int: [UInt8]] in
      try self.readPCRs(indices, bank: bank)
    }
  }

  /// A new key, made as ``createKey(_:authValue:)`` makes it, off the cooperative pool.
  public func createKey(_ algorithm: KeyAlgorithm = .eccP256, authValue: [UInt8] = []) async throws(TPMError)
    -> TSS2PrivateKey
  {
    try await BlockingPool.shared.run { () throws(TPMError) -> TSS2PrivateKey in
      try self.createKey(algorithm, authValue: authValue)
    }
  }

  /// A new attestation key, made as ``createAttestationKey()`` makes it, off the cooperative
  /// pool.
  public func createAttestationKey() async throws(TPMError) -> TSS2PrivateKey {
    try await BlockingPool.shared.run { () throws(TPMError) -> TSS2PrivateKey in try self.createAttestationKey() }
  }

  /// The key persisted at `handle`, opened as ``loadKey(at:authValue:)`` opens it, off the
  /// cooperative pool.
  public func loadKey(at handle: PersistentHandle, authValue: [UInt8] = []) async throws(TPMError) -> TPMKey {
    try await BlockingPool.shared.run { () throws(TPMError) -> TPMKey in
      try self.loadKey(at: handle, authValue: authValue)
    }
  }

  /// Persists a key, as ``persist(_:at:)`` does, off the cooperative pool.
  public func persist(_ file: TSS2PrivateKey, at handle: PersistentHandle) async throws(TPMError) {
    try await BlockingPool.shared.run { () throws(TPMError) in try self.persist(file, at: handle) }
  }

  /// Removes a persisted key, as ``evict(_:)`` does, off the cooperative pool.
  public func evict(_ handle: PersistentHandle) async throws(TPMError) {
    try await BlockingPool.shared.run { () throws(TPMError) in try self.evict(handle) }
  }

  /// The persistent handles, as ``persistentHandles()`` lists them, off the cooperative pool.
  public func persistentHandles() async throws(TPMError) -> [PersistentHandle] {
    try await BlockingPool.shared.run { () throws(TPMError) -> [PersistentHandle] in try self.persistentHandles() }
  }

  /// Persists the storage root key, as ``persistStorageRootKey()`` does, off the cooperative
  /// pool.
  @discardableResult
  public func persistStorageRootKey() async throws(TPMError) -> Bool {
    try await BlockingPool.shared.run { () throws(TPMError) -> Bool in try self.persistStorageRootKey() }
  }

  /// Flushes leaked transient objects, as ``flushAllTransientObjects()`` does, off the
  /// cooperative pool.
  public func flushAllTransientObjects() async throws(TPMError) -> Int {
    try await BlockingPool.shared.run { () throws(TPMError) -> Int in try self.flushAllTransientObjects() }
  }

  /// The EK certificate, as ``endorsementCertificate(_:)`` reads it, off the cooperative pool.
  public func endorsementCertificate(_ type: EndorsementKeyType) async throws(TPMError) -> [UInt8]? {
    try await BlockingPool.shared.run { () throws(TPMError) -> [UInt8]? in try self.endorsementCertificate(type) }
  }

  /// The endorsement key, as ``endorsementKey(_:)`` derives it (seconds for RSA on a real chip),
  /// off the cooperative pool.
  public func endorsementKey(_ type: EndorsementKeyType) async throws(TPMError) -> PublicKey {
    try await BlockingPool.shared.run { () throws(TPMError) -> PublicKey in try self.endorsementKey(type) }
  }
}

extension TPMKey {
  /// Loads the key now, as ``load()`` does, off the cooperative pool.
  public func load() async throws(TPMError) {
    try await BlockingPool.shared.run { () throws(TPMError) in try self.load() }
  }

  /// Signs `digest`, as ``sign(digest:hash:padding:)`` does, off the cooperative pool.
  public func sign(digest: [UInt8], hash: HashAlgorithm, padding: RSAPadding = .pkcs1) async throws(TPMError)
    -> Signature
  {
    try await BlockingPool.shared.run { () throws(TPMError) -> Signature in
      try self.sign(digest: digest, hash: hash, padding: padding)
    }
  }

  /// TPM2_Certify of this key, as ``certify(by:qualifyingData:)`` does, off the cooperative pool.
  public func certify(by attestationKey: AttestationKey, qualifyingData: [UInt8]) async throws(TPMError)
    -> CertifyEvidence
  {
    try await BlockingPool.shared.run { () throws(TPMError) -> CertifyEvidence in
      try self.certify(by: attestationKey, qualifyingData: qualifyingData)
    }
  }
}

extension AttestationKey {
  /// Loads the attestation key now, as ``load()`` does, off the cooperative pool.
  public func load() async throws(TPMError) {
    try await BlockingPool.shared.run { () throws(TPMError) in try self.load() }
  }

  /// TPM2_ActivateCredential, as ``activateCredential(_:endorsementKey:)`` does, off the
  /// cooperative pool.
  public func activateCredential(_ challenge: CredentialChallenge, endorsementKey type: EndorsementKeyType)
    async throws(TPMError) -> [UInt8]
  {
    try await BlockingPool.shared.run { () throws(TPMError) -> [UInt8] in
      try self.activateCredential(challenge, endorsementKey: type)
    }
  }
}
