internal import CEdgeKeyProvider
internal import CTSS2

extension TPM {
  /// Creates a device key under the standard SRK and returns it as a key file.
  ///
  /// The key is non-exportable (fixedTPM, fixedParent, sensitiveDataOrigin) and can only sign.
  /// A key without a password is exempt from dictionary-attack lockout (noDA): there is nothing
  /// to guess, and a power cut mid-authorization must not lock a fleet's TPMs. A key with a
  /// password is DA-protected: the TPM's lockout is then the only bound on guessing it, and
  /// EdgeKey never spends a strike by itself (a missing password is refused before the TPM is
  /// asked, see ``loadKey(_:authValue:)``). Costs TPM2_Create (ECC: ~10 ms on swtpm,
  /// 85–310 ms on real chips; RSA-2048: 0.15–0.5 s on swtpm, up to 7.5 s on real chips) plus
  /// the SRK (TPM2_CreatePrimary unless persisted at 0x81000001).
  public func createKey(_ algorithm: KeyAlgorithm = .eccP256, authValue: [UInt8] = []) throws(TPMError)
    -> TSS2PrivateKey
  {
    guard authValue.count <= 64 else {
      throw TPMError(.invalidArgument, reason: "an auth value is at most 64 bytes")
    }
    logger.debug("creating key", metadata: ["algorithm": algorithm.rawValue])
    return try create(
      algorithm.template(dictionaryAttackProtected: !authValue.isEmpty), authValue: authValue,
      what: "a \(algorithm) key")
  }

  /// Creates an attestation key under the standard SRK (the TCG's LAK: "TPM 2.0 Keys for Device
  /// Identity and Attestation"): ECC P-256, restricted to signing what the TPM itself produces
  /// (TPM2_Certify, TPM2_Quote) with ECDSA and SHA-256, non-exportable, noDA. It cannot sign
  /// an arbitrary digest, and ``loadKey(_:authValue:)`` refuses it: it is never a TLS or CSR
  /// key. Costs TPM2_Create, as ``createKey(_:authValue:)``.
  public func createAttestationKey() throws(TPMError) -> TSS2PrivateKey {
    var t = KeyAlgorithm.eccP256.template()
    t.publicArea.objectAttributes = ObjectAttributes.attestationKey.rawValue
    t.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_ECDSA
    t.publicArea.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256
    return try create(t, authValue: [], what: "the attestation key")
  }

  private func create(_ template: TPM2B_PUBLIC, authValue: [UInt8], what: String) throws(TPMError)
    -> TSS2PrivateKey
  {
    try withESYS { ctx throws(TPMError) in
      var srk: ESYS_TR = ESYS_TR(ESYS_TR_NONE)
      var srkTransient: Int32 = 0
      try check("getting the storage root key") { edgekey_tpm_srk_locked(raw, ctx, &srk, &srkTransient, $0) }
      defer { if srkTransient != 0 { Esys_FlushContext(ctx, srk) } }

      var sensitive = TPM2B_SENSITIVE_CREATE()
      sensitive.sensitive.userAuth.size = UInt16(authValue.count)
      withUnsafeMutableBytes(of: &sensitive.sensitive.userAuth.buffer) { $0.copyBytes(from: authValue) }
      var template = template
      var outside = TPM2B_DATA()
      var pcrs = TPML_PCR_SELECTION()
      var outPrivate: UnsafeMutablePointer<TPM2B_PRIVATE>? = nil
      var outPublic: UnsafeMutablePointer<TPM2B_PUBLIC>? = nil
      var creationData: UnsafeMutablePointer<TPM2B_CREATION_DATA>? = nil
      var creationHash: UnsafeMutablePointer<TPM2B_DIGEST>? = nil
      var ticket: UnsafeMutablePointer<TPMT_TK_CREATION>? = nil
      defer {
        esysFree(outPrivate)
        esysFree(outPublic)
        esysFree(creationData)
        esysFree(creationHash)
        esysFree(ticket)
      }
      var rc: UInt32 = 0
      for _ in 0..<4 {
        rc = Esys_Create(
          ctx, srk, ESYS_TR(ESYS_TR_PASSWORD), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE),
          &sensitive, &template, &outside, &pcrs, &outPrivate, &outPublic, &creationData,
          &creationHash, &ticket)
        // The TPM needs a free slot while it creates: make one (our least recently used key,
        // loaded again when next used) and try again.
        guard ResponseCode(rawValue: rc) ~= .objectMemory, edgekey_tpm_make_room(raw, ctx, srk) == 1 else { break }
      }
      try esys("TPM2_Create", "creating \(what)", rc)
      return TSS2PrivateKey(
        parent: EDGEKEY_PARENT_OWNER, emptyAuth: authValue.isEmpty,
        publicBlob: try marshal(outPublic!.pointee, Tss2_MU_TPM2B_PUBLIC_Marshal),
        privateBlob: try marshal(outPrivate!.pointee, Tss2_MU_TPM2B_PRIVATE_Marshal))
    }
  }

  /// Opens a key file (ours, tpm2-openssl's or tpm2-tss-engine's) for signing. No TPM traffic
  /// until the first use.
  ///
  /// Throws ``TPMError/Code/authRequired`` when the file says the key has a password
  /// (`emptyAuth` FALSE) and `authValue` is empty: signing with an empty auth would only cost a
  /// dictionary-attack strike, so nothing is sent to the TPM.
  public func loadKey(_ file: TSS2PrivateKey, authValue: [UInt8] = []) throws(TPMError) -> TPMKey {
    if !file.emptyAuth && authValue.isEmpty {
      throw TPMError(
        .authRequired,
        reason: "the key file says the key has a password and none was given (refused before any TPM "
          + "command, so no dictionary-attack strike)")
    }
    var key: OpaquePointer? = nil
    let rc = file.publicBlob.withUnsafeBufferPointer { pub in
      file.privateBlob.withUnsafeBufferPointer { priv in
        authValue.withUnsafeBufferPointer { auth in
          edgekey_tpm_key_from_blobs(
            raw, file.parent, pub.baseAddress, pub.count, priv.baseAddress, priv.count, auth.baseAddress,
            auth.count, &key)
        }
      }
    }
    guard rc == 0, let key else {
      throw TPMError(responseCode: rc, command: nil, context: "opening the key file")
    }
    return try TPMKey(raw: key, tpm: self, storage: .blob(parent: file.parent))
  }

  /// Opens the key persisted at `handle`. One TPM2_ReadPublic.
  public func loadKey(at handle: PersistentHandle, authValue: [UInt8] = []) throws(TPMError) -> TPMKey {
    var key: OpaquePointer? = nil
    var command: UnsafePointer<CChar>? = nil
    let rc = authValue.withUnsafeBufferPointer {
      edgekey_tpm_key_from_persistent(raw, handle.rawValue, $0.baseAddress, $0.count, &key, &command)
    }
    guard rc == 0, let key else {
      throw TPMError(
        responseCode: rc, command: command.map { String(cString: $0) }, context: "opening the key at \(handle)")
    }
    return try TPMKey(raw: key, tpm: self, storage: .persistent(handle))
  }

  /// Makes a key file's key persistent at `handle` (TPM2_Load + TPM2_EvictControl).
  /// Throws ``TPMError/Code/handleInUse`` when the handle is taken.
  public func persist(_ file: TSS2PrivateKey, at handle: PersistentHandle) throws(TPMError) {
    var pub = TPM2B_PUBLIC()
    var priv = TPM2B_PRIVATE()
    try unmarshal(file.publicBlob, into: &pub, Tss2_MU_TPM2B_PUBLIC_Unmarshal)
    try unmarshal(file.privateBlob, into: &priv, Tss2_MU_TPM2B_PRIVATE_Unmarshal)
    try withESYS { ctx throws(TPMError) in
      var parent = ESYS_TR(ESYS_TR_NONE)
      var parentTransient: Int32 = 0
      if file.parent == EDGEKEY_PARENT_OWNER {
        try check("getting the storage root key") { edgekey_tpm_srk_locked(raw, ctx, &parent, &parentTransient, $0) }
      } else {
        parent = try object(ctx, at: file.parent, "opening the parent")
      }
      var loaded = ESYS_TR(ESYS_TR_NONE)
      var rc: UInt32 = 0
      for _ in 0..<4 {
        rc = Esys_Load(
          ctx, parent, ESYS_TR(ESYS_TR_PASSWORD), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), &priv, &pub,
          &loaded)
        guard ResponseCode(rawValue: rc) ~= .objectMemory, edgekey_tpm_make_room(raw, ctx, parent) == 1 else { break }
      }
      if parentTransient != 0 {
        Esys_FlushContext(ctx, parent)
      } else if file.parent != EDGEKEY_PARENT_OWNER {
        Esys_TR_Close(ctx, &parent)
      }
      try esys("TPM2_Load", "loading the key to persist it", rc)
      defer { Esys_FlushContext(ctx, loaded) }
      try evictControl(ctx, loaded, handle.rawValue, "persisting at \(handle)")
    }
    logger.info("persisted key", metadata: ["handle": "\(handle)"])
  }

  /// Removes the object persisted at `handle` from the TPM's NV memory (TPM2_EvictControl).
  /// The key is gone for good unless a key file of it exists.
  public func evict(_ handle: PersistentHandle) throws(TPMError) {
    try withESYS { ctx throws(TPMError) in
      var persisted = try object(ctx, at: handle.rawValue, "opening \(handle)")
      do throws(TPMError) {
        try evictControl(ctx, persisted, handle.rawValue, "evicting \(handle)")
      } catch {
        Esys_TR_Close(ctx, &persisted)
        throw error
      }
    }
    logger.info("evicted persistent object", metadata: ["handle": "\(handle)"])
  }

  /// Handles of the objects persisted in the TPM (one TPM2_GetCapability).
  public func persistentHandles() throws(TPMError) -> [PersistentHandle] {
    try withESYS { ctx throws(TPMError) in try handles(ctx, from: 0x8100_0000) }
      .compactMap { PersistentHandle(rawValue: $0) }
  }

  /// Persists the standard SRK at 0x81000001 so key loads skip TPM2_CreatePrimary (3–5 ms on
  /// swtpm, up to seconds on a real chip). Reuses it when present; throws
  /// ``TPMError/Code/srkMismatch`` when another key holds the handle. Returns true when it
  /// had to create it.
  @discardableResult
  public func persistStorageRootKey() throws(TPMError) -> Bool {
    try withESYS { ctx throws(TPMError) -> Bool in
      let present = try handles(ctx, from: EDGEKEY_SRK_HANDLE, count: 1).first == EDGEKEY_SRK_HANDLE
      var srk = ESYS_TR(ESYS_TR_NONE)
      var transient: Int32 = 0
      try check("getting the storage root key") { edgekey_tpm_srk_locked(raw, ctx, &srk, &transient, $0) }
      if transient == 0 { return false }
      defer { Esys_FlushContext(ctx, srk) }
      if present {
        throw TPMError(
          .srkMismatch,
          reason: "0x81000001 holds a key that is not the standard ECC P-256 SRK; evict it or use key files")
      }
      try evictControl(ctx, srk, EDGEKEY_SRK_HANDLE, "persisting the SRK")
      return true
    }
  }

  /// Flushes every transient object in the TPM. Over a TCTI without a resource manager this
  /// also removes other processes' objects: only for recovery when nothing else uses the TPM.
  /// Returns how many were flushed.
  public func flushAllTransientObjects() throws(TPMError) -> Int {
    try withESYS { ctx throws(TPMError) in
      var flushed: Int32 = 0
      try esys(
        "TPM2_FlushContext", "flushing transient objects", edgekey_tpm_flush_all_transients_locked(raw, ctx, &flushed))
      return Int(flushed)
    }
  }

  /// An ESYS_TR for the object at a TPM handle (one TPM2_ReadPublic).
  func object(_ ctx: OpaquePointer, at handle: UInt32, _ context: String) throws(TPMError) -> ESYS_TR {
    var tr = ESYS_TR(ESYS_TR_NONE)
    try esys(
      "TPM2_ReadPublic", context,
      Esys_TR_FromTPMPublic(ctx, handle, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), &tr))
    return tr
  }

  /// TPM2_EvictControl under the owner hierarchy: persists a transient object at `handle`, or
  /// evicts the persistent object at `handle` (then `object` is consumed).
  func evictControl(_ ctx: OpaquePointer, _ object: ESYS_TR, _ handle: UInt32, _ context: String) throws(TPMError) {
    var result = ESYS_TR(ESYS_TR_NONE)
    try esys(
      "TPM2_EvictControl", context,
      Esys_EvictControl(
        ctx, ESYS_TR(ESYS_TR_RH_OWNER), object, ESYS_TR(ESYS_TR_PASSWORD), ESYS_TR(ESYS_TR_NONE),
        ESYS_TR(ESYS_TR_NONE), handle, &result))
    if result != ESYS_TR(ESYS_TR_NONE) { Esys_TR_Close(ctx, &result) }
  }

  func handles(_ ctx: OpaquePointer, from first: UInt32, count: UInt32 = 254) throws(TPMError) -> [UInt32] {
    var more: TPMI_YES_NO = 0
    var data: UnsafeMutablePointer<TPMS_CAPABILITY_DATA>? = nil
    defer { esysFree(data) }
    try esys(
      "TPM2_GetCapability", "listing handles",
      Esys_GetCapability(
        ctx, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), TPM2_CAP_HANDLES, first,
        count, &more, &data))
    let list = data!.pointee.data.handles
    return withUnsafeBytes(of: list.handle) { raw in
      Array(raw.bindMemory(to: UInt32.self).prefix(Int(list.count)))
    }.filter { $0 >> 24 == first >> 24 }
  }
}

func marshal<T>(
  _ value: T, _ fn: (UnsafePointer<T>?, UnsafeMutablePointer<UInt8>?, Int, UnsafeMutablePointer<Int>?) -> UInt32
) throws(TPMError) -> [UInt8] {
  var value = value
  var out = [UInt8](repeating: 0, count: MemoryLayout<T>.size + 8)
  var size = 0
  let rc = fn(&value, &out, out.count, &size)
  guard rc == 0 else { throw TPMError(responseCode: rc, command: nil, context: "marshaling") }
  return Array(out.prefix(size))
}

func unmarshal<T>(
  _ bytes: [UInt8], into value: inout T,
  _ fn: (UnsafePointer<UInt8>?, Int, UnsafeMutablePointer<Int>?, UnsafeMutablePointer<T>?) -> UInt32
) throws(TPMError) {
  var offset = 0
  let rc = bytes.withUnsafeBufferPointer { fn($0.baseAddress, $0.count, &offset, &value) }
  guard rc == 0, offset == bytes.count else {
    throw TPMError(.invalidKeyFile, responseCode: ResponseCode(rawValue: rc), reason: "malformed TPM structure")
  }
}
