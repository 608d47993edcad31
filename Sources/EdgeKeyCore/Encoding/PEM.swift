/// PEM armour (RFC 7468), strict about labels, lenient about whitespace.
package enum PEM {
  package static func encode(_ der: [UInt8], label: String) -> String {
    "-----BEGIN \(label)-----\n" + Base64.encodeLines(der) + "-----END \(label)-----\n"
  }

  package static func decode(_ text: String, label: String) -> [UInt8]? {
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
package enum Base64 {
  private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

  /// Base64 in lines of `width` characters, each ended by `newline` (the last one too).
  package static func encodeLines(_ bytes: [UInt8], width: Int = 64, newline: String = "\n") -> String {
    let text = encode(bytes)
    var out = ""
    var index = text.startIndex
    while index < text.endIndex {
      let end = text.index(index, offsetBy: width, limitedBy: text.endIndex) ?? text.endIndex
      out += text[index..<end] + newline
      index = end
    }
    return out
  }

  package static func encode(_ bytes: [UInt8]) -> String {
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
  package static func decode(_ text: String) -> [UInt8]? {
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
