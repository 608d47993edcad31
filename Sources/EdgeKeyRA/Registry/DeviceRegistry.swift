internal import COpenSSL
import EdgeKeyCore
import EdgeKeyTLS
import Foundation

/// The registration authority's record of devices: who may enrol, under which name, with
/// which credential; every certificate issued; what was revoked; and an audit trail. Every
/// issuance is decided and recorded in one durable transaction, so a certificate is handed out
/// only once it is in the registry, and no name is ever given to two devices.
public final class DeviceRegistry: Sendable {
  /// Where the registry is kept.
  public let storage: any DeviceRegistryStorage

  /// A registry kept in `storage`.
  public init(storage: any DeviceRegistryStorage) { self.storage = storage }

  /// The embedded registry in an SQLite file (created 0600 if missing).
  public convenience init(path: String) throws(RegistryError) {
    self.init(storage: try SQLiteRegistryStorage(path: path))
  }

  // MARK: - Reading

  /// The device with `id`, or nil.
  public func device(_ id: String) throws(RegistryError) -> DeviceRecord? {
    try storage.read { t throws(RegistryError) in try t.device(id) }
  }
  /// How many devices the registry holds (one query).
  public func deviceCount() throws(RegistryError) -> Int {
    try storage.read { t throws(RegistryError) in try t.deviceCount() }
  }
  /// Every device.
  public func devices() throws(RegistryError) -> [DeviceRecord] {
    try storage.read { t throws(RegistryError) in try t.devices() }
  }
  /// The certificates issued to `device`, oldest first.
  public func certificates(of device: String) throws(RegistryError) -> [CertificateRecord] {
    try storage.read { t throws(RegistryError) in try t.certificates(of: device) }
  }
  /// The certificate with this serial (hex), or nil.
  public func certificate(serial: String) throws(RegistryError) -> CertificateRecord? {
    try storage.read { t throws(RegistryError) in try t.certificate(serial: serial.uppercased()) }
  }
  /// The latest audit entries, newest last; for one device or all.
  public func audit(device: String? = nil, limit: Int = 100) throws(RegistryError) -> [AuditEntry] {
    try storage.read { t throws(RegistryError) in try t.audit(device: device, limit: limit) }
  }
  /// The reserved name patterns (never issued to any device).
  public func reserved() throws(RegistryError) -> [String] {
    try storage.read { t throws(RegistryError) in try t.reserved() }
  }
  /// Certificates revoked and not yet expired at `date`: what a CRL lists.
  public func revokedCertificates(at date: Date = Date()) throws(RegistryError) -> [CertificateRecord] {
    try storage.read { t throws(RegistryError) in try t.revokedCertificates() + t.externalRevocations() }.filter {
      $0.notAfter > date
    }
  }
  /// Grows by one with every revocation: a CRL made at an older version is out of date.
  public func revocationVersion() throws(RegistryError) -> Int64 {
    try storage.read { t throws(RegistryError) in try t.counter("revocations") }
  }
  package func nextCRLNumber() throws(RegistryError) -> Int64 {
    try storage.write { t throws(RegistryError) in try t.increment("crl") }
  }

  // MARK: - Administration

  /// Adds the devices of a factory manifest, all or none. Returns the ids added.
  @discardableResult
  public func importManifest(_ entries: [ManifestEntry], naming: NamingPolicy, source: String = "admin")
    throws(RegistryError) -> [String]
  {
    try storage.write { t throws(RegistryError) in
      var naming = naming
      naming.reserved += try t.reserved()
      var added: [String] = []
      for entry in entries {
        if let why = ManifestEntry.idProblem(entry.id) {
          throw RegistryError(.invalid, "line \(entry.line): device id: \(why)")
        }
        for name in entry.names {
          if let why = naming.problem(with: name) {
            throw RegistryError(.invalid, "line \(entry.line) (\(entry.id)): \(why)")
          }
        }
        let verifier: String?
        let method: EnrolmentMethod
        switch entry.credential {
        case .secret(let secret):
          guard secret.utf8.count >= 16 else {
            throw RegistryError(
              .invalid, "line \(entry.line) (\(entry.id)): a one-time secret needs 16 characters or more")
          }
          verifier = SecretVerifier.make(secret)
          method = .oneTimeSecret
        case .bootstrapFingerprint:
          verifier = nil
          method = .bootstrapCertificate
        }
        var fingerprint: String?
        if case .bootstrapFingerprint(let f) = entry.credential { fingerprint = f }
        do throws(RegistryError) {
          try t.insert(
            DeviceRecord(
              id: entry.id, names: entry.names, state: .active, method: method, bootstrapFingerprint: fingerprint,
              secretUsed: nil, created: Date()),
            secretVerifier: verifier)
        } catch {
          throw RegistryError(error.kind, "line \(entry.line): \(error.message)")
        }
        try t.append(
          AuditEntry(
            time: Date(), device: entry.id, event: "imported",
            detail: "names \(entry.names.joined(separator: ", ")); enrols with \(method.rawValue)", source: source))
        added.append(entry.id)
      }
      return added
    }
  }

  /// Revokes one certificate. Returns false when it was already revoked.
  @discardableResult
  public func revoke(serial: String, reason: RevocationReason = .unspecified, source: String = "admin")
    throws(RegistryError) -> Bool
  {
    try storage.write { t throws(RegistryError) in
      guard let c = try t.certificate(serial: serial.uppercased()) else {
        throw RegistryError(.notFound, "no certificate with serial \(serial) in the registry")
      }
      guard c.revoked == nil else { return false }
      try Self.revoke(c, reason: reason, source: source, in: t)
      return true
    }
  }

  /// Revokes a certificate of this CA that the registry did not issue (a broker's server
  /// certificate, say): it is listed on every CRL from now on.
  public func revokeExternal(serial: String, reason: RevocationReason = .unspecified, source: String = "admin")
    throws(RegistryError)
  {
    let hex = serial.uppercased().replacingOccurrences(of: ":", with: "")
    guard !hex.isEmpty, hex.allSatisfy(\.isHexDigit) else {
      throw RegistryError(.invalid, "\(serial) is not a hex serial")
    }
    try storage.write { t throws(RegistryError) in
      if try t.certificate(serial: hex) != nil {
        throw RegistryError(.conflict, "certificate \(hex) is in the registry: revoke it without --external")
      }
      try t.revokeExternal(serial: hex, at: Date(), reason: reason)
      _ = try t.increment("revocations")
      try t.append(
        AuditEntry(
          time: Date(), device: nil, event: "external certificate revoked", detail: "serial \(hex): \(reason.rawValue)",
          source: source))
    }
  }

  /// Marks a device revoked (it may not enrol or renew again) and revokes its certificates.
  /// Returns the serials revoked.
  @discardableResult
  public func revokeDevice(_ id: String, reason: RevocationReason = .unspecified, source: String = "admin")
    throws(RegistryError) -> [String]
  {
    try end(id, state: .revoked, reason: reason, source: source)
  }

  /// Takes a device out of service: its certificates are revoked (cessation of operation)
  /// and its names released for a replacement.
  @discardableResult
  public func retire(_ id: String, source: String = "admin") throws(RegistryError) -> [String] {
    try end(id, state: .retired, reason: .cessationOfOperation, source: source)
  }

  private func end(_ id: String, state: DeviceState, reason: RevocationReason, source: String) throws(RegistryError)
    -> [String]
  {
    try storage.write { t throws(RegistryError) in
      guard try t.device(id) != nil else { throw RegistryError(.notFound, "no device \(JSON.string(id))") }
      try t.setState(state, of: id)
      var serials: [String] = []
      for c in try t.certificates(of: id) where c.revoked == nil {
        try Self.revoke(c, reason: reason, source: source, in: t)
        serials.append(c.serial)
      }
      if state == .retired { try t.releaseNames(of: id) }
      try t.append(
        AuditEntry(
          time: Date(), device: id, event: state.rawValue, detail: "\(serials.count) certificate(s) revoked",
          source: source))
      return serials
    }
  }

  private static func revoke(
    _ c: CertificateRecord, reason: RevocationReason, source: String, in t: any RegistryTransaction
  ) throws(RegistryError) {
    try t.revoke(serial: c.serial, at: Date(), reason: reason)
    _ = try t.increment("revocations")
    try t.append(
      AuditEntry(
        time: Date(), device: c.device, event: "certificate revoked",
        detail: "serial \(c.serial) (\(c.subject)): \(reason.rawValue)", source: source))
  }

  /// Gives an active device a new one-time secret, so that it can enrol a new key (its TPM was
  /// cleared or replaced); the certificates of its old key are revoked when it does.
  public func rearm(_ id: String, secret: String, source: String = "admin") throws(RegistryError) {
    guard secret.utf8.count >= 16 else {
      throw RegistryError(.invalid, "a one-time secret needs 16 characters or more")
    }
    try storage.write { t throws(RegistryError) in
      guard let device = try t.device(id) else { throw RegistryError(.notFound, "no device \(JSON.string(id))") }
      guard device.state == .active else {
        throw RegistryError(.conflict, "device \(JSON.string(id)) is \(device.state.rawValue)")
      }
      try t.setSecret(SecretVerifier.make(secret), of: id)
      try t.append(
        AuditEntry(time: Date(), device: id, event: "secret re-armed", detail: "a new one-time secret", source: source))
    }
  }

  /// Names (or `*`/`?` patterns) never issued to a device, kept in the registry.
  public func reserve(_ patterns: [String], source: String = "admin") throws(RegistryError) {
    try storage.write { t throws(RegistryError) in
      let devices = try t.devices()
      for p in patterns {
        if let holder = devices.first(where: { d in d.names.contains { NamingPolicy.matches($0, pattern: p) } }) {
          throw RegistryError(.conflict, "\(JSON.string(p)) matches a name of device \(JSON.string(holder.id))")
        }
        try t.reserve(p)
        try t.append(AuditEntry(time: Date(), device: nil, event: "reserved", detail: p, source: source))
      }
    }
  }
}

/// One device of a factory manifest.
public struct ManifestEntry: Sendable, Equatable {
  /// How a device proves it is the one imported.
  public enum Credential: Sendable, Equatable {
    /// A one-time secret (stored only as a verifier).
    case secret(String)
    /// The SHA-256 fingerprint (hex) of the device's bootstrap certificate.
    case bootstrapFingerprint(String)
  }
  /// The device id.
  public var id: String
  /// The names it may have in its certificates.
  public var names: [String]
  /// How it proves itself at first enrollment.
  public var credential: Credential
  /// Where it was in the manifest (for error messages).
  public var line: Int

  /// An entry; `line` is its line in the manifest, for errors.
  public init(id: String, names: [String], credential: Credential, line: Int = 0) {
    self.id = id
    self.names = names
    self.credential = credential
    self.line = line
  }

  static func idProblem(_ id: String) -> String? {
    if id.isEmpty { return "empty" }
    if id.utf8.count > 128 { return "longer than 128 bytes" }
    if id.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F || $0 == ":" }) {
      return "contains a control character or a colon (it is the HTTP Basic user name)"
    }
    return nil
  }

  /// Parses a manifest: JSON lines (`{"serial": ..., "name": ... or "names": [...], "secret": ...
  /// or "bootstrapFingerprint": ... or "bootstrapCertificate": PEM}`) or CSV with a header row
  /// naming `serial`, `name` and one of `secret`, `bootstrap_fingerprint`. Blank lines and lines
  /// starting with # are skipped.
  public static func parse(_ bytes: [UInt8]) throws(RegistryError) -> [ManifestEntry] {
    guard let text = String(validating: bytes, as: UTF8.self) else {
      throw RegistryError(.invalid, "the manifest is not UTF-8")
    }
    var lines: [(Int, String)] = []
    // "\r\n" is one Character in Swift: split on both, so that CRLF files read as lines.
    let split = text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" })
    for (i, raw) in split.enumerated() {
      let line = raw.hasSuffix("\r") ? String(raw.dropLast()) : String(raw)
      if line.trimmingCharacters(in: .whitespaces).isEmpty || line.hasPrefix("#") { continue }
      lines.append((i + 1, line))
    }
    guard let first = lines.first else { return [] }
    if first.1.hasPrefix("{") { return try lines.map { (n, l) throws(RegistryError) in try jsonLine(l, line: n) } }
    let header = first.1.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
    guard let serial = header.firstIndex(of: "serial"), let name = header.firstIndex(of: "name") else {
      throw RegistryError(.invalid, "line \(first.0): a CSV manifest starts with a header naming serial and name")
    }
    let secret = header.firstIndex(of: "secret")
    let fingerprint = header.firstIndex(of: "bootstrap_fingerprint")
    guard (secret == nil) != (fingerprint == nil) else {
      throw RegistryError(.invalid, "line \(first.0): the header names one of secret or bootstrap_fingerprint")
    }
    return try lines.dropFirst().map { (n, l) throws(RegistryError) in
      let fields = l.split(separator: ",", omittingEmptySubsequences: false).map {
        $0.trimmingCharacters(in: .whitespaces)
      }
      guard fields.count == header.count else {
        throw RegistryError(.invalid, "line \(n): \(fields.count) fields, the header has \(header.count)")
      }
      let credential: Credential =
        if let secret { .secret(fields[secret]) } else {
          try .bootstrapFingerprint(normalised(fields[fingerprint!], n))
        }
      return ManifestEntry(id: fields[serial], names: [fields[name]], credential: credential, line: n)
    }
  }

  private static func jsonLine(_ text: String, line: Int) throws(RegistryError) -> ManifestEntry {
    guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
      throw RegistryError(.invalid, "line \(line): not a JSON object")
    }
    guard let id = object["serial"] as? String ?? object["id"] as? String else {
      throw RegistryError(.invalid, "line \(line): no \"serial\"")
    }
    let names = (object["names"] as? [String]) ?? (object["name"] as? String).map { [$0] } ?? []
    guard !names.isEmpty else { throw RegistryError(.invalid, "line \(line): no \"name\"") }
    let credential: Credential
    if let secret = object["secret"] as? String {
      credential = .secret(secret)
    } else if let fingerprint = object["bootstrapFingerprint"] as? String {
      credential = .bootstrapFingerprint(try normalised(fingerprint, line))
    } else if let pem = object["bootstrapCertificate"] as? String {
      guard let certificate = try? Certificate.chain(pem: pem).first else {
        throw RegistryError(.invalid, "line \(line): bootstrapCertificate is not a PEM certificate")
      }
      credential = .bootstrapFingerprint(certificate.fingerprint)
    } else {
      throw RegistryError(.invalid, "line \(line): no \"secret\", \"bootstrapFingerprint\" or \"bootstrapCertificate\"")
    }
    return ManifestEntry(id: id, names: names, credential: credential, line: line)
  }

  private static func normalised(_ fingerprint: String, _ line: Int) throws(RegistryError) -> String {
    let hex = fingerprint.replacingOccurrences(of: ":", with: "").lowercased()
    let bare = hex.hasPrefix("sha256") ? String(hex.dropFirst(6)) : hex
    guard bare.count == 64, bare.allSatisfy(\.isHexDigit) else {
      throw RegistryError(.invalid, "line \(line): a bootstrap fingerprint is 64 hex digits (SHA-256)")
    }
    return bare
  }
}

/// A one-time secret is stored as a salted PBKDF2-HMAC-SHA256 verifier, never as itself.
enum SecretVerifier {
  static let iterations: Int32 = 10_000

  static func make(_ secret: String) -> String {
    var salt = [UInt8](repeating: 0, count: 16)
    RAND_bytes(&salt, Int32(salt.count))
    return
      "pbkdf2-sha256$\(iterations)$\(Text.hex(salt))$\(Text.hex(derive(secret, salt: salt, iterations: iterations)))"
  }

  static func verify(_ secret: String, against verifier: String) -> Bool {
    let parts = verifier.split(separator: "$")
    guard parts.count == 4, parts[0] == "pbkdf2-sha256", let iterations = Int32(parts[1]),
      let salt = bytes(hex: parts[2]), let expected = bytes(hex: parts[3])
    else { return false }
    return ESTService.constantTimeEqual(derive(secret, salt: salt, iterations: iterations), expected)
  }

  private static func derive(_ secret: String, salt: [UInt8], iterations: Int32) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    let password = Array(secret.utf8)
    _ = password.withUnsafeBufferPointer { p in
      p.withMemoryRebound(to: CChar.self) {
        PKCS5_PBKDF2_HMAC(
          $0.baseAddress, Int32(password.count), salt, Int32(salt.count), iterations, EVP_sha256(), 32, &out)
      }
    }
    return out
  }

  private static func bytes(hex: Substring) -> [UInt8]? {
    guard hex.count % 2 == 0 else { return nil }
    var result: [UInt8] = []
    var index = hex.startIndex
    while index < hex.endIndex {
      let next = hex.index(index, offsetBy: 2)
      guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
      result.append(byte)
      index = next
    }
    return result
  }
}
