internal import CEdgeKeyProvider
internal import CTSS2
import EdgeKeyCore

#if canImport(Glibc)
  import Glibc
#endif

/// The public half of a TPM key, in the TPM's terms and in X.509's. No TPM traffic.
public struct PublicKey: Sendable, Equatable, CustomStringConvertible {
  /// The key kind; nil for a key EdgeKey does not make (e.g. P-521).
  public var algorithm: KeyAlgorithm?
  /// What the TPM says the key may do and whether it can leave the TPM.
  public var attributes: ObjectAttributes
  /// SubjectPublicKeyInfo DER: what certificates and CSRs carry.
  public var spki: [UInt8]
  /// The marshaled TPM2B_PUBLIC.
  public var tpmPublic: [UInt8]

  package init(marshaledPublic blob: [UInt8]) throws(TPMError) {
    var pub = TPM2B_PUBLIC()
    var offset = 0
    let rc = blob.withUnsafeBufferPointer {
      Tss2_MU_TPM2B_PUBLIC_Unmarshal($0.baseAddress, $0.count, &offset, &pub)
    }
    guard rc == 0, offset == blob.count else {
      throw TPMError(.invalidKeyFile, reason: "the public part is not a TPM2B_PUBLIC")
    }
    try self.init(pub)
  }

  init(_ pub: TPM2B_PUBLIC) throws(TPMError) {
    var pub = pub
    var der: UnsafeMutablePointer<UInt8>? = nil
    var len = 0
    let rc = edgekey_public_to_spki(&pub, &der, &len)
    guard rc == 0, let der else {
      throw TPMError(responseCode: rc, command: nil, context: "converting the TPM public key")
    }
    defer { free(der) }
    spki = Array(UnsafeBufferPointer(start: der, count: len))
    algorithm = KeyAlgorithm(publicArea: pub.publicArea)
    attributes = ObjectAttributes(rawValue: pub.publicArea.objectAttributes)
    var out = [UInt8](repeating: 0, count: 1024)
    var size = 0
    let mrc = Tss2_MU_TPM2B_PUBLIC_Marshal(&pub, &out, out.count, &size)
    precondition(mrc == 0, "a TPM2B_PUBLIC that unmarshaled must marshal")
    tpmPublic = Array(out.prefix(size))
  }

  /// Reads a marshaled TPMT_PUBLIC (a public area without its size prefix, as TPM2_Certify
  /// evidence carries it).
  package init(publicArea: [UInt8]) throws(TPMError) {
    guard publicArea.count <= 0xFFFF else { throw TPMError(.invalidKeyFile, reason: "the public area is too long") }
    try self.init(marshaledPublic: [UInt8(publicArea.count >> 8), UInt8(publicArea.count & 0xFF)] + publicArea)
  }

  /// The marshaled TPMT_PUBLIC: ``tpmPublic`` without its size prefix.
  public var publicArea: [UInt8] { Array(tpmPublic.dropFirst(2)) }

  /// The TPM Name: nameAlg (0x000B, SHA-256) followed by SHA-256 of the TPMT_PUBLIC. What
  /// TPM2_Certify names and what a credential is made for. Keys with another name algorithm get
  /// an empty Name (EdgeKey makes SHA-256 keys only).
  public var name: [UInt8] {
    guard tpmPublic.count > 4, tpmPublic[4] == 0x00, tpmPublic[5] == 0x0B else { return [] }
    let area = publicArea
    var digest = [UInt8](repeating: 0, count: 32)
    area.withUnsafeBufferPointer { edgekey_sha256($0.baseAddress, $0.count, &digest) }
    return [0x00, 0x0B] + digest
  }

  /// PEM (`-----BEGIN PUBLIC KEY-----`), readable by `openssl pkey -pubin`.
  public var pem: String { PEM.encode(spki, label: "PUBLIC KEY") }

  /// SHA-256 of the SubjectPublicKeyInfo, lowercase hex: the key's identity across tools
  /// (`openssl pkey -pubin -outform DER | sha256sum`).
  public var fingerprint: String {
    var digest = [UInt8](repeating: 0, count: 32)
    spki.withUnsafeBufferPointer { edgekey_sha256($0.baseAddress, $0.count, &digest) }
    return digest.map { String($0, radix: 16).leftPadded(to: 2) }.joined()
  }

  public var description: String {
    "\(algorithm?.rawValue ?? "unknown") key sha256:\(fingerprint) [\(attributes)]"
  }
}

extension String {
  func leftPadded(to width: Int, with pad: Character = "0") -> String {
    count >= width ? self : String(repeating: pad, count: width - count) + self
  }
}
