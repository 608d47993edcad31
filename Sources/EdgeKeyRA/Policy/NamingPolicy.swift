import EdgeKeyCore
import EdgeKeyTLS
import Foundation

/// Which names the registration authority may put in a certificate, and how a name is
/// derived. A device's name becomes its MQTT user name (`use_identity_as_username`), so a name
/// that could reach into another device's topics, or an operator's identity, is never issued.
public struct NamingPolicy: Sendable {
  /// Longest name, in Unicode scalars (X.520's upper bound for a common name is 64).
  public var maximumLength = 64
  /// Names (or patterns with `*` and `?`) that are never issued to a device: the operators'
  /// and back ends' own identities.
  public var reserved: [String] = []
  /// With a shared password (`--allow-shared-password`), the names it may enrol.
  public var sharedPasswordPattern: String?
  /// The name a bootstrap certificate that is not in the registry enrols, `{cn}` standing for
  /// its common name ("device-{cn}"); nil: only bootstrap certificates in the registry enrol.
  public var bootstrapNameTemplate: String?
  /// Whether a bootstrap certificate may enrol its device again after the operational
  /// certificate was lost (the earlier certificates are then revoked as superseded).
  public var reenrolAfterLoss = true
  /// Subject attributes allowed besides the one CN (which must be the device's name).
  public var subjectAttributes: Set<String> = ["O", "OU", "C", "ST", "L"]
  /// Subject alternative names a device may have, `{name}` standing for its name
  /// ("DNS:{name}.fleet.local"); none by default.
  public var subjectAlternativeNames: [String] = []

  /// The default: the device id as common name, no alternative names.
  public init() {}

  /// Why `name` cannot be a device's name, or nil when it can. The rules keep a name from
  /// acting as an MQTT topic level wildcard or separator (`/ + #`), a broker-internal topic
  /// (`$`), a forged log line (control characters) or an empty user name.
  public func problem(with name: String) -> String? {
    if name.isEmpty { return "the name is empty" }
    if name.unicodeScalars.count > maximumLength { return "the name is longer than \(maximumLength) characters" }
    if name.hasPrefix("$") { return "the name starts with $ (reserved for the broker's own topics)" }
    if name != name.trimmingCharacters(in: .whitespaces) { return "the name starts or ends with a space" }
    for scalar in name.unicodeScalars {
      switch scalar {
      case "/", "+", "#":
        return "the name contains \(scalar), which is an MQTT topic separator or wildcard"
      case _ where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value):
        return "the name contains the control character U+\(String(scalar.value, radix: 16, uppercase: true))"
      case _
      where scalar.properties.generalCategory == .format || scalar.properties.generalCategory == .lineSeparator
        || scalar.properties.generalCategory == .paragraphSeparator:
        return "the name contains the invisible character U+\(String(scalar.value, radix: 16, uppercase: true))"
      default: continue
      }
    }
    if let pattern = reserved.first(where: { NamingPolicy.matches(name, pattern: $0) }) {
      return pattern == name ? "\(name) is reserved" : "\(name) is reserved (\(pattern))"
    }
    return nil
  }

  /// The name a bootstrap certificate with common name `cn` enrols under the template.
  public func bootstrapName(commonName cn: String) -> String? {
    bootstrapNameTemplate.map { $0.replacingOccurrences(of: "{cn}", with: cn) }
  }

  /// Checks a request against the name the device may hold: the subject has exactly one CN,
  /// equal to `name`, and otherwise only allowed attributes in single-valued RDNs, each
  /// UTF8String or PrintableString with valid content; the SANs are all allowed. Returns why
  /// not, or nil.
  package func problem(with csr: CertificateSigningRequest, name: String) -> String? {
    let entries = csr.subjectEntries
    var sets: Set<Int32> = []
    var commonNames: [String] = []
    for entry in entries {
      guard sets.insert(entry.set).inserted else {
        return "the subject has a multi-valued RDN (\(entry.field) joined with another by +)"
      }
      guard let text = entry.text else {
        return "the subject's \(entry.field) is not valid UTF8String or PrintableString text"
      }
      if entry.field == "CN" {
        commonNames.append(text)
        continue
      }
      guard subjectAttributes.contains(entry.field) else {
        return
          "the subject attribute \(entry.field) is not allowed (\(subjectAttributes.sorted().joined(separator: ", ")))"
      }
      if let why = NamingPolicy.textProblem(text) { return "the subject's \(entry.field): \(why)" }
    }
    guard commonNames.count == 1 else {
      return commonNames.isEmpty ? "the request's subject has no common name" : "the subject has more than one CN"
    }
    guard commonNames[0] == name else {
      return "this credential enrols the name \(JSON.string(name)), not \(JSON.string(commonNames[0]))"
    }
    let allowed = Set(allowedSubjectAlternativeNames(for: name))
    for san in csr.subjectAlternativeNames where !allowed.contains(san.description) {
      return allowed.isEmpty
        ? "subject alternative names are not allowed (asked: \(san))"
        : "the subject alternative name \(san) is not allowed (allowed: \(allowed.sorted().joined(separator: ", ")))"
    }
    return nil
  }

  /// The SANs `name` may have, as text ("DNS:device-1.fleet.local").
  package func allowedSubjectAlternativeNames(for name: String) -> [String] {
    subjectAlternativeNames.map { $0.replacingOccurrences(of: "{name}", with: name) }
  }

  /// Text in a subject attribute: no control or invisible characters.
  static func textProblem(_ text: String) -> String? {
    for scalar in text.unicodeScalars
    where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || scalar.properties.generalCategory == .format {
      return "contains U+\(String(scalar.value, radix: 16, uppercase: true))"
    }
    return nil
  }

  /// A glob: `*` matches any run of characters, `?` one; everything else itself.
  public static func matches(_ text: String, pattern: String) -> Bool {
    let t = Array(text.unicodeScalars)
    let p = Array(pattern.unicodeScalars)
    var ti = 0
    var pi = 0
    var star: Int?
    var mark = 0
    while ti < t.count {
      if pi < p.count && (p[pi] == "?" || (p[pi] != "*" && p[pi] == t[ti])) {
        ti += 1
        pi += 1
      } else if pi < p.count && p[pi] == "*" {
        star = pi
        mark = ti
        pi += 1
      } else if let s = star {
        pi = s + 1
        mark += 1
        ti = mark
      } else {
        return false
      }
    }
    while pi < p.count && p[pi] == "*" { pi += 1 }
    return pi == p.count
  }

  /// The user names a mosquitto ACL file grants (`user NAME` lines): operator and back-end
  /// identities, to be reserved.
  public static func aclUsers(_ acl: String) -> [String] {
    acl.split(whereSeparator: \.isNewline).compactMap { line in
      let trimmed = line.trimmingCharacters(in: .whitespaces)
      guard trimmed.hasPrefix("user ") else { return nil }
      let name = trimmed.dropFirst(5).trimmingCharacters(in: .whitespaces)
      return name.isEmpty ? nil : name
    }
  }
}
