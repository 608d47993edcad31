import EdgeKeyCore
import FoundationEssentials

/// Reading what EST servers actually send (RFC 8951): base64 with or without line breaks,
/// CRLF, PEM armour, a trailing NUL; the Content-Transfer-Encoding header is ignored.
package enum ESTBody {
  /// The DER inside `body`, or nil.
  package static func decode(_ body: [UInt8]) -> [UInt8]? {
    var bytes = body
    while let last = bytes.last, last == 0 || last == 10 || last == 13 || last == 32 || last == 9 {
      bytes.removeLast()
    }
    guard !bytes.isEmpty else { return nil }
    // Some servers send binary DER.
    if bytes[0] == 0x30 { return bytes }
    var text = String(decoding: bytes, as: UTF8.self)
    if text.contains("-----BEGIN ") {
      // PEM armour with whatever label (PKCS7, CERTIFICATE REQUEST ...): keep the lines inside.
      let lines = text.split(whereSeparator: { $0 == "\n" || $0 == "\r" })
      text = lines.filter { !$0.hasPrefix("-----") }.joined()
    }
    let compact = text.filter { !$0.isWhitespace }
    guard compact.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "+" || $0 == "/" || $0 == "=") })
    else { return nil }
    // Padding is sometimes dropped.
    let padded = compact + String(repeating: "=", count: (4 - compact.count % 4) % 4)
    return Base64.decode(padded)
  }

  /// Retry-After as seconds from now: delta-seconds or an HTTP-date.
  package static func retryAfter(_ value: String, now: Date = Date()) -> TimeInterval? {
    let trimmed = value.trimmingSpaces()
    if trimmed.isEmpty { return nil }
    if let seconds = Int(trimmed) { return TimeInterval(max(seconds, 0)) }
    guard let date = Timestamp.httpDate(trimmed, now: now) else { return nil }
    return max(date.timeIntervalSince(now), 0)
  }

  /// A server's error text, made safe for a log line: printable, one line, bounded.
  package static func message(_ body: [UInt8]) -> String {
    let text = String(decoding: body.prefix(2048), as: UTF8.self)
    let printable = text.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? " " : String($0) }.joined()
    let collapsed = printable.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
    if collapsed.isEmpty { return "(no message)" }
    return collapsed.count > 400 ? String(collapsed.prefix(400)) + "…" : collapsed
  }

  /// Every OBJECT IDENTIFIER in a DER structure, as dotted text (csrattrs).
  package static func objectIdentifiers(in der: [UInt8]) -> [String] {
    var result: [String] = []
    func walk(_ bytes: ArraySlice<UInt8>, depth: Int) {
      guard depth < 8 else { return }
      var i = bytes.startIndex
      while i + 1 < bytes.endIndex {
        let tag = bytes[i]
        var length = Int(bytes[i + 1])
        var start = i + 2
        if length & 0x80 != 0 {
          let count = length & 0x7F
          guard count <= 3, start + count <= bytes.endIndex else { return }
          length = bytes[start..<(start + count)].reduce(0) { $0 << 8 | Int($1) }
          start += count
        }
        guard start + length <= bytes.endIndex else { return }
        let content = bytes[start..<(start + length)]
        if tag == 0x06 {
          result.append(dotted(Array(content)))
        } else if tag & 0x20 != 0 {
          walk(content, depth: depth + 1)
        }
        i = start + length
      }
    }
    walk(der[...], depth: 0)
    return result
  }

  private static func dotted(_ bytes: [UInt8]) -> String {
    guard let first = bytes.first else { return "" }
    var parts = [first < 80 ? Int(first) / 40 : 2, first < 80 ? Int(first) % 40 : Int(first) - 80]
    var value = 0
    for byte in bytes.dropFirst() {
      value = value << 7 | Int(byte & 0x7F)
      if byte & 0x80 == 0 {
        parts.append(value)
        value = 0
      }
    }
    return parts.map(String.init).joined(separator: ".")
  }
}
