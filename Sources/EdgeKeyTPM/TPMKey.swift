internal import CEdgeKeyProvider
internal import CTSS2

/// A signing key held by the TPM, ready to sign.
///
/// The key is loaded on first use and stays loaded, so a signature costs exactly one TPM
/// command (TPM2_Sign) over a digest computed in software. If the TPM loses the object
/// (reset, or flushed by another process) it is loaded again once, transparently. The
/// transient object is flushed when the last reference to this value goes away.
/// Thread-safe: signatures from several threads are serialized on the TPM's lock.
public final class TPMKey: @unchecked Sendable {
  // @unchecked: the C key is only touched under the TPM's lock (edgekey_tpm_key_* take it).
  package let raw: OpaquePointer
  /// The TPM this key lives in.
  public let tpm: TPM
  /// The public half, read once when the key was opened.
  public let publicKey: PublicKey
  /// Where the key is kept.
  public let storage: Storage

  /// How a key is kept between runs.
  public enum Storage: Sendable, Equatable {
    /// At a persistent handle in the TPM's NV memory.
    case persistent(PersistentHandle)
    /// As blobs (a TSS2 PRIVATE KEY file) under a parent, usually the standard SRK.
    case blob(parent: UInt32)
  }

  init(raw: OpaquePointer, tpm: TPM, storage: Storage) throws(TPMError) {
    self.raw = raw
    self.tpm = tpm
    self.storage = storage
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

  /// The key's kind (nil for a key EdgeKey does not make, e.g. P-521 from another tool).
  public var algorithm: KeyAlgorithm? { publicKey.algorithm }

  /// How many times this key has been loaded into the TPM (1 in steady state; more after a
  /// TPM reset or an eviction to make room for another key).
  public var loadCount: UInt64 { edgekey_tpm_key_load_count(raw) }

  /// Loads the key now rather than at the first signature (SRK + TPM2_Load).
  public func load() throws(TPMError) {
    try check("loading key") { edgekey_tpm_key_load(raw, $0) }
  }

  /// Flushes the key's transient object; the next signature loads it again.
  public func unload() {
    edgekey_tpm_key_unload(raw)
  }

  /// Signs a digest that was computed in software. One TPM2_Sign (plus a load the first time).
  ///
  /// - Returns: DER ECDSA-Sig-Value for ECC keys; the raw signature block for RSA keys.
  public func sign(digest: [UInt8], hash: HashAlgorithm, padding: RSAPadding = .pkcs1) throws(TPMError)
    -> Signature
  {
    guard digest.count == hash.digestLength else {
      throw TPMError(
        .invalidArgument,
        reason: "a \(hash.rawValue) digest is \(hash.digestLength) bytes, got \(digest.count)")
    }
    let scheme: TPM2_ALG_ID
    switch publicKey.algorithm {
    case .eccP256, .eccP384: scheme = TPM2_ALG_ECDSA
    case .rsa2048, .rsa3072: scheme = padding == .pss ? TPM2_ALG_RSAPSS : TPM2_ALG_RSASSA
    case nil:
      throw TPMError(.unsupported, reason: "this key's algorithm is not one EdgeKey signs with")
    }
    var signature = TPMT_SIGNATURE()
    try check("signing") { command in
      digest.withUnsafeBufferPointer { d in
        edgekey_tpm_key_sign(raw, scheme, hash.tpmID, d.baseAddress, d.count, &signature, command)
      }
    }
    var out = [UInt8](repeating: 0, count: 600)
    var length = 0
    try check("encoding the signature") { _ in edgekey_signature_encode(&signature, &out, out.count, &length) }
    return Signature(
      bytes: Array(out.prefix(length)), hash: hash,
      padding: scheme == TPM2_ALG_RSAPSS ? .pss : (scheme == TPM2_ALG_RSASSA ? .pkcs1 : nil))
  }
}

/// A signature made by the TPM, in the encoding X.509 and TLS use.
public struct Signature: Sendable, Equatable {
  /// DER ECDSA-Sig-Value (ECC) or the raw signature block (RSA).
  public var bytes: [UInt8]
  /// The digest algorithm that was signed.
  public var hash: HashAlgorithm
  /// The RSA padding; nil for ECDSA.
  public var padding: RSAPadding?

  /// A signature of `bytes` over a `hash` digest (`padding` for RSA).
  public init(bytes: [UInt8], hash: HashAlgorithm, padding: RSAPadding? = nil) {
    self.bytes = bytes
    self.hash = hash
    self.padding = padding
  }
}
