import CEdgeKeyProvider
import CTSS2

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

  init(marshaledPublic blob: [UInt8]) throws(TPMError) {
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

/// PEM armour (RFC 7468), strict about labels, lenient about whitespace.
enum PEM {
  static func encode(_ der: [UInt8], label: String) -> String {
    let b64 = Base64.encode(der)
    var lines = ["-----BEGIN \(label)-----"]
    var index = b64.startIndex
    while index < b64.endIndex {
      let end = b64.index(index, offsetBy: 64, limitedBy: b64.endIndex) ?? b64.endIndex
      lines.append(String(b64[index..<end]))
      index = end
    }
    lines.append("-----END \(label)-----")
    return lines.joined(separator: "\n") + "\n"
  }

  static func decode(_ text: String, label: String) -> [UInt8]? {
    let begin = "-----BEGIN \(label)-----"
    let end = "-----END \(label)-----"
    var body: [Substring] = []
    var inside = false
    for line in text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }) {
      let trimmed = line.drop { $0 == " " || $0 == "\t" }
      if !inside {
        if trimmed.hasPrefix(begin) { inside = true }
      } else if trimmed.hasPrefix(end) {
        return Base64.decode(body.joined())
      } else {
        body.append(trimmed)
      }
    }
    return nil
  }
}

/// Base64 without Foundation (the TPM layer stays small for C-sized devices).
enum Base64 {
  private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

  static func encode(_ bytes: [UInt8]) -> String {
    var out: [UInt8] = []
    out.reserveCapacity((bytes.count + 2) / 3 * 4)
    var i = 0
    while i + 2 < bytes.count {
      let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
      out += [
        alphabet[Int(n >> 18 & 63)], alphabet[Int(n >> 12 & 63)], alphabet[Int(n >> 6 & 63)], alphabet[Int(n & 63)],
      ]
      i += 3
    }
    let rest = bytes.count - i
    if rest == 1 {
      let n = UInt32(bytes[i]) << 16
      out += [alphabet[Int(n >> 18 & 63)], alphabet[Int(n >> 12 & 63)], 61, 61]
    } else if rest == 2 {
      let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8
      out += [alphabet[Int(n >> 18 & 63)], alphabet[Int(n >> 12 & 63)], alphabet[Int(n >> 6 & 63)], 61]
    }
    return String(decoding: out, as: UTF8.self)
  }

  /// Decodes, skipping whitespace; nil on any other non-alphabet byte or bad padding.
  static func decode(_ text: String) -> [UInt8]? {
    var values: [UInt8] = []
    var padding = 0
    for c in text.utf8 {
      switch c {
      case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(c - 65)
      case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(c - 71)
      case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(c + 4)
      case UInt8(ascii: "+"): values.append(62)
      case UInt8(ascii: "/"): values.append(63)
      case UInt8(ascii: "="): padding += 1; continue
      case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): continue
      default: return nil
      }
      if padding > 0 { return nil }  // data after padding
    }
    guard padding <= 2, (values.count + padding) % 4 == 0, values.count % 4 != 1 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(values.count * 3 / 4)
    var i = 0
    while i < values.count {
      let chunk = values[i..<min(i + 4, values.count)]
      var n: UInt32 = 0
      for (j, v) in chunk.enumerated() { n |= UInt32(v) << (18 - 6 * j) }
      out.append(UInt8(n >> 16 & 0xFF))
      if chunk.count > 2 { out.append(UInt8(n >> 8 & 0xFF)) }
      if chunk.count > 3 { out.append(UInt8(n & 0xFF)) }
      i += 4
    }
    return out
  }
}
