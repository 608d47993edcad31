/// A configuration file of `key = value` lines, as `edgekey agent --config FILE` reads it:
///
///     # /etc/edgekey/agent.conf
///     state  = /var/lib/edgekey
///     server = https://est.example.com/.well-known/est
///     subject = "O=Acme Fleet,CN=sensor-17"
///
/// Blank lines and lines whose first non-blank character is `#` are ignored. A key is lower-case
/// letters, digits and `-` (the long option's name). A value runs to the end of the line, spaces
/// trimmed, `#` included; in double quotes it keeps its spaces and takes the escapes `\"`, `\\`,
/// `\t` and `\n`. A key given twice, a line without `=`, control characters, text that is not
/// UTF-8 and files over 64 KiB are refused with the line number.
package struct ConfigFile: Sendable, Equatable {
  package struct Entry: Sendable, Equatable {
    package var key: String
    package var value: String
    /// 1-based line number in the file.
    package var line: Int

    package init(key: String, value: String, line: Int) {
      self.key = key
      self.value = value
      self.line = line
    }
  }

  package static let maximumBytes = 64 << 10

  package var entries: [Entry]

  package init(entries: [Entry]) { self.entries = entries }

  /// The value for `key`, if given.
  package subscript(key: String) -> String? { entries.first { $0.key == key }?.value }

  /// Parses `bytes`; `origin` (the path) goes into error messages.
  package init(parsing bytes: [UInt8], origin: String) throws(ConfigError) {
    guard bytes.count <= ConfigFile.maximumBytes else {
      throw ConfigError(origin: origin, line: nil, "larger than \(ConfigFile.maximumBytes) bytes")
    }
    guard String(validating: bytes, as: UTF8.self) != nil else {
      throw ConfigError(origin: origin, line: nil, "not UTF-8 text")
    }
    // Worked on bytes: lines, `=`, quotes and blanks are ASCII, so every piece cut at them is
    // UTF-8 again, and no grapheme cluster (a combining mark after a blank, CR LF) moves a cut.
    var entries: [Entry] = []
    var number = 0
    for rawLine in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
      number += 1
      var line = rawLine
      if line.last == 0x0D { line = line.dropLast() }
      let trimmed = line.trimmingBlanks
      if trimmed.isEmpty || trimmed.first == UInt8(ascii: "#") { continue }
      if let bad = trimmed.first(where: { ($0 < 0x20 && $0 != 0x09) || $0 == 0x7F }) {
        throw ConfigError(
          origin: origin, line: number, "control character 0x\(String(bad, radix: 16, uppercase: true))")
      }
      guard let equals = trimmed.firstIndex(of: UInt8(ascii: "=")) else {
        throw ConfigError(origin: origin, line: number, "expected key = value")
      }
      let key = String(decoding: trimmed[..<equals].trimmingBlanks, as: UTF8.self)
      guard ConfigFile.isValidKey(key) else {
        throw ConfigError(
          origin: origin, line: number,
          key.isEmpty ? "missing key before =" : "invalid key \"\(key)\" (lower-case letters, digits and -)")
      }
      if let earlier = entries.first(where: { $0.key == key }) {
        throw ConfigError(origin: origin, line: number, "\(key) is already set on line \(earlier.line)")
      }
      let value = try ConfigFile.value(trimmed[(equals + 1)...].trimmingBlanks, origin, number)
      entries.append(Entry(key: key, value: value, line: number))
    }
    self.entries = entries
  }

  /// Reads and parses the file at `path`.
  package init(contentsOf path: String) throws(ConfigError) {
    let bytes: [UInt8]
    do { bytes = try AtomicFile.read(path, limit: ConfigFile.maximumBytes + 1) } catch {
      throw ConfigError(origin: path, line: nil, "cannot read: \(error)")
    }
    try self.init(parsing: bytes, origin: path)
  }

  /// The text that parses back to these entries (values quoted when they need it).
  package var text: String {
    entries.map { entry in
      let u = Array(entry.value.utf8)
      let blank: (UInt8?) -> Bool = { $0 == 0x20 || $0 == 0x09 }
      let plain = !u.isEmpty && u[0] != UInt8(ascii: "\"") && !blank(u.first) && !blank(u.last) && !u.contains(0x0A)
      return "\(entry.key) = \(plain ? entry.value : ConfigFile.quoted(entry.value))\n"
    }.joined()
  }

  static func isValidKey(_ key: String) -> Bool {
    guard let first = key.unicodeScalars.first, key.unicodeScalars.count <= 64 else { return false }
    func allowed(_ c: Unicode.Scalar) -> Bool { ("a"..."z").contains(c) || ("0"..."9").contains(c) }
    return allowed(first) && key.unicodeScalars.allSatisfy { allowed($0) || $0 == "-" }
  }

  private static func value(_ bytes: ArraySlice<UInt8>, _ origin: String, _ line: Int) throws(ConfigError) -> String {
    guard bytes.first == UInt8(ascii: "\"") else { return String(decoding: bytes, as: UTF8.self) }
    var result: [UInt8] = []
    var index = bytes.startIndex + 1
    while index < bytes.endIndex {
      let c = bytes[index]
      index += 1
      if c == UInt8(ascii: "\"") {
        let rest = bytes[index...].trimmingBlanks
        guard rest.isEmpty || rest.first == UInt8(ascii: "#") else {
          throw ConfigError(origin: origin, line: line, "text after the closing quote")
        }
        return String(decoding: result, as: UTF8.self)
      }
      if c != UInt8(ascii: "\\") {
        result.append(c)
        continue
      }
      guard index < bytes.endIndex else { break }
      switch bytes[index] {
      case UInt8(ascii: "\""): result.append(UInt8(ascii: "\""))
      case UInt8(ascii: "\\"): result.append(UInt8(ascii: "\\"))
      case UInt8(ascii: "t"): result.append(0x09)
      case UInt8(ascii: "n"): result.append(0x0A)
      default:
        throw ConfigError(
          origin: origin, line: line, "unknown escape \\\(String(decoding: bytes[index...].prefix(1), as: UTF8.self))")
      }
      index += 1
    }
    throw ConfigError(origin: origin, line: line, "missing closing quote")
  }

  private static func quoted(_ value: String) -> String {
    var r: [UInt8] = [UInt8(ascii: "\"")]
    for c in value.utf8 {
      switch c {
      case UInt8(ascii: "\""), UInt8(ascii: "\\"): r += [UInt8(ascii: "\\"), c]
      case 0x09: r += Array("\\t".utf8)
      case 0x0A: r += Array("\\n".utf8)
      default: r.append(c)
      }
    }
    return String(decoding: r + [UInt8(ascii: "\"")], as: UTF8.self)
  }
}

/// A configuration file that cannot be used: where, and why.
package struct ConfigError: Error, CustomStringConvertible, Sendable, Equatable {
  package var origin: String
  package var line: Int?
  package var reason: String

  package init(origin: String, line: Int?, _ reason: String) {
    self.origin = origin
    self.line = line
    self.reason = reason
  }

  package var description: String { "\(origin)\(line.map { ":\($0)" } ?? ""): \(reason)" }
}

extension ArraySlice<UInt8> {
  fileprivate var trimmingBlanks: ArraySlice<UInt8> {
    var s = self
    while let f = s.first, f == 0x20 || f == 0x09 { s = s.dropFirst() }
    while let l = s.last, l == 0x20 || l == 0x09 { s = s.dropLast() }
    return s
  }
}
