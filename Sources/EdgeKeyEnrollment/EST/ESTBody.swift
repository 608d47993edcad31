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
  package static func objectIdentifiers(in der: [UInt8]) -> [String] { DERReader.allOIDs(der[...]) }
}
