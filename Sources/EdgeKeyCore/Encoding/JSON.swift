/// JSON text for the one-line records EdgeKey prints and logs (CLI `--json`, issuance logs).
package enum JSON {
  /// `s` as a JSON string literal, quotes included, control characters escaped.
  package static func string(_ s: String) -> String {
    var r = "\""
    for c in s.unicodeScalars {
      switch c {
      case "\"": r += "\\\""
      case "\\": r += "\\\\"
      case "\n": r += "\\n"
      case "\r": r += "\\r"
      case "\t": r += "\\t"
      default:
        if c.value < 0x20 {
          let hex = String(c.value, radix: 16)
          r += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        } else {
          r.unicodeScalars.append(c)
        }
      }
    }
    return r + "\""
  }
}
