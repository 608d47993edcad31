internal import CEdgeKeyProvider
internal import CTSS2
import EdgeKeyCore

/// A TPM key as a `TSS2 PRIVATE KEY` file: the format tpm2-openssl and tpm2-tss-engine read
/// and write. The private part is wrapped by the parent (the SRK) and useless off this TPM.
public struct TSS2PrivateKey: Sendable, Equatable {
  /// The parent: 0x40000001 (the owner hierarchy's standard SRK) or a persistent handle.
  public var parent: UInt32
  /// True when the key has no auth value.
  public var emptyAuth: Bool
  /// Marshaled TPM2B_PUBLIC.
  public var publicBlob: [UInt8]
  /// Marshaled TPM2B_PRIVATE (encrypted by the parent).
  public var privateBlob: [UInt8]

  /// The parent handle of keys under the owner hierarchy's standard SRK (0x40000001, as
  /// tpm2-openssl writes it).
  public static let standardParent: UInt32 = 0x4000_0001

  /// A key file of the TPM's blobs under `parent`.
  public init(
    parent: UInt32 = TSS2PrivateKey.standardParent, emptyAuth: Bool, publicBlob: [UInt8], privateBlob: [UInt8]
  ) {
    self.parent = parent
    self.emptyAuth = emptyAuth
    self.publicBlob = publicBlob
    self.privateBlob = privateBlob
  }

  /// Decodes DER. Throws ``TPMError/Code/invalidKeyFile`` saying what is wrong.
  public init(der: [UInt8]) throws(TPMError) {
    var file = edgekey_keyfile()
    var why = [CChar](repeating: 0, count: 160)
    let rc = der.withUnsafeBufferPointer {
      edgekey_keyfile_decode($0.baseAddress, $0.count, &file, &why, why.count)
    }
    guard rc == 0 else {
      let reason = String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
      throw TPMError(.invalidKeyFile, responseCode: ResponseCode(rawValue: rc), reason: "TSS2 PRIVATE KEY: \(reason)")
    }
    parent = file.parent
    emptyAuth = file.empty_auth != 0
    publicBlob = withUnsafeBytes(of: file.pub) { Array($0.prefix(file.pub_len)) }
    privateBlob = withUnsafeBytes(of: file.priv) { Array($0.prefix(file.priv_len)) }
  }

  /// Decodes the PEM text (`-----BEGIN TSS2 PRIVATE KEY-----`).
  public init(pem: String) throws(TPMError) {
    guard let der = PEM.decode(pem, label: "TSS2 PRIVATE KEY") else {
      throw TPMError(.invalidKeyFile, reason: "no -----BEGIN TSS2 PRIVATE KEY----- block with valid base64")
    }
    try self.init(der: der)
  }

  /// Reads a PEM or DER key file.
  public init(contentsOf path: String) throws(TPMError) {
    let bytes: [UInt8]
    do { bytes = try AtomicFile.read(path, limit: 64 << 10) } catch {
      throw TPMError(.invalidKeyFile, reason: "cannot read key file: \(error)")
    }
    if bytes.first == 0x30 {
      try self.init(der: bytes)
    } else {
      try self.init(pem: String(decoding: bytes, as: UTF8.self))
    }
  }

  /// DER encoding.
  public var der: [UInt8] {
    var file = edgekey_keyfile()
    file.parent = parent
    file.empty_auth = emptyAuth ? 1 : 0
    withUnsafeMutableBytes(of: &file.pub) { $0.copyBytes(from: publicBlob) }
    file.pub_len = publicBlob.count
    withUnsafeMutableBytes(of: &file.priv) { $0.copyBytes(from: privateBlob) }
    file.priv_len = privateBlob.count
    var out: UnsafeMutablePointer<UInt8>? = nil
    var len = 0
    guard edgekey_keyfile_encode(&file, &out, &len) == 0, let out else {
      // Only allocation can fail for a value that decoded or was built from TPM outputs.
      fatalError("TSS2 PRIVATE KEY encoding failed: out of memory")
    }
    defer { free(out) }
    return Array(UnsafeBufferPointer(start: out, count: len))
  }

  /// PEM text, as tpm2-openssl writes it.
  public var pem: String { PEM.encode(der, label: "TSS2 PRIVATE KEY") }

  /// Writes the PEM file atomically, readable by its owner only (0600).
  public func write(to path: String) throws(FileError) {
    try AtomicFile.write(Array(pem.utf8), to: path, mode: 0o600)
  }

  /// The key's public half. No TPM traffic.
  public func publicKey() throws(TPMError) -> PublicKey {
    try PublicKey(marshaledPublic: publicBlob)
  }
}

#if canImport(Glibc)
  import Glibc
#endif
