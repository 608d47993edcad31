/// The few text helpers EdgeKey needs from Foundation, written here so that the libraries and
/// the `edgekey` binary link FoundationEssentials only (the full Foundation, with ICU, adds
/// about 7 MB to a device's resident memory).
package enum Text {
  /// Lower-case hexadecimal, two digits per byte.
  package static func hex(_ bytes: some Sequence<UInt8>) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    for byte in bytes {
      out.append(digits[Int(byte >> 4)])
      out.append(digits[Int(byte & 0x0F)])
    }
    return String(decoding: out, as: UTF8.self)
  }

  /// `value` with `digits` decimals, rounded half away from zero, as `%.Nf` prints it for the
  /// magnitudes we log (durations, counts). Non-finite values print as `inf`, `-inf`, `nan`.
  package static func fixed(_ value: Double, _ digits: Int = 0) -> String {
    guard value.isFinite else { return value.isNaN ? "nan" : (value < 0 ? "-inf" : "inf") }
    var scale = 1.0
    for _ in 0..<max(digits, 0) { scale *= 10 }
    let scaled = (abs(value) * scale).rounded(.toNearestOrAwayFromZero)
    guard scaled < 9.0e18 else { return String(value) }
    let units = UInt64(scaled)
    let whole = units / UInt64(scale)
    var text = String(whole)
    if digits > 0 {
      let fraction = String(units % UInt64(scale))
      text += "." + String(repeating: "0", count: digits - fraction.count) + fraction
    }
    return (value < 0 && units != 0 ? "-" : "") + text
  }
}

extension StringProtocol {
  /// Without leading and trailing spaces and tabs (what `trimmingCharacters(in: .whitespaces)`
  /// removes from header and configuration values).
  package func trimmingSpaces() -> String { trimming { $0 == " " || $0 == "\t" } }

  /// Without leading and trailing white space and line breaks.
  package func trimmingWhitespace() -> String { trimming(\.isWhitespace) }

  private func trimming(_ trimmed: (Character) -> Bool) -> String {
    guard let first = firstIndex(where: { !trimmed($0) }) else { return "" }
    let last = lastIndex(where: { !trimmed($0) })!
    return String(self[first...last])
  }

  /// Padded with spaces, or cut, to `width` characters.
  package func padded(to width: Int) -> String {
    count >= width ? String(prefix(width)) : String(self) + String(repeating: " ", count: width - count)
  }
}
