import EdgeKeyCore
import Foundation

/// Where the device registry is kept. The embedded default is `SQLiteRegistryStorage` (one
/// file, WAL, fsync'd per commit); a shared database for several RA instances implements the
/// same two entry points. A write transaction is atomic and durable when it returns, and two
/// writers never interleave (a name can never be given to two devices).
public protocol DeviceRegistryStorage: AnyObject, Sendable {
  /// Runs `body` in a read transaction (a consistent snapshot).
  func read<R>(_ body: (any RegistryTransaction) throws(RegistryError) -> R) throws(RegistryError) -> R
  /// Runs `body` in a write transaction: committed durably when `body` returns, rolled back
  /// when it throws.
  func write<R>(_ body: (any RegistryTransaction) throws(RegistryError) -> R) throws(RegistryError) -> R
}

/// The registry's operations inside one transaction.
public protocol RegistryTransaction {
  /// The device with `id`, or nil.
  func device(_ id: String) throws(RegistryError) -> DeviceRecord?
  /// The device whose bootstrap certificate has this SHA-256 fingerprint, or nil.
  func device(bootstrapFingerprint: String) throws(RegistryError) -> DeviceRecord?
  /// The device holding `name`, if any.
  func holder(of name: String) throws(RegistryError) -> String?
  /// Every device.
  func devices() throws(RegistryError) -> [DeviceRecord]
  /// How many devices there are.
  func deviceCount() throws(RegistryError) -> Int
  /// The stored verifier of a device's one-time secret (never the secret).
  func secretVerifier(of device: String) throws(RegistryError) -> String?
  /// Adds a device and its names; `.conflict` when the id exists or a name is held.
  func insert(_ device: DeviceRecord, secretVerifier: String?) throws(RegistryError)
  /// Sets a device's state.
  func setState(_ state: DeviceState, of device: String) throws(RegistryError)
  /// Marks a device's one-time secret used.
  func setSecretUsed(_ at: Date, of device: String) throws(RegistryError)
  /// Gives a device a new one-time secret (its verifier), unused.
  func setSecret(_ verifier: String, of device: String) throws(RegistryError)
  /// Frees every name a device holds.
  func releaseNames(of device: String) throws(RegistryError)
  /// The certificate with this serial, or nil.
  func certificate(serial: String) throws(RegistryError) -> CertificateRecord?
  /// A device's certificates, oldest first.
  func certificates(of device: String) throws(RegistryError) -> [CertificateRecord]
  /// Every revoked certificate.
  func revokedCertificates() throws(RegistryError) -> [CertificateRecord]
  /// Records an issued certificate.
  func insert(_ certificate: CertificateRecord) throws(RegistryError)
  /// Revokes an issued certificate.
  func revoke(serial: String, at: Date, reason: RevocationReason) throws(RegistryError)
  /// Revokes a certificate of the CA that the registry did not issue (a broker's, an
  /// operator's); it stays on the CRL.
  func revokeExternal(serial: String, at: Date, reason: RevocationReason) throws(RegistryError)
  /// The certificates `revokeExternal` revoked.
  func externalRevocations() throws(RegistryError) -> [CertificateRecord]
  /// Appends an audit entry.
  func append(_ entry: AuditEntry) throws(RegistryError)
  /// The latest entries, newest last; for one device or all.
  func audit(device: String?, limit: Int) throws(RegistryError) -> [AuditEntry]
  /// The reserved name patterns.
  func reserved() throws(RegistryError) -> [String]
  /// Reserves a name pattern.
  func reserve(_ pattern: String) throws(RegistryError)
  /// Adds one to a named counter and returns the new value (CRL numbers, revocation version).
  func increment(_ counter: String) throws(RegistryError) -> Int64
  /// A named counter's value (0 when never incremented).
  func counter(_ counter: String) throws(RegistryError) -> Int64
  /// The TPM a device proved it holds (EK, activated AK), if any.
  func attestation(of device: String) throws(RegistryError) -> AttestationRecord?
  /// The device whose TPM has this endorsement key (SHA-256 of its SubjectPublicKeyInfo).
  func attestation(endorsementKey fingerprint: String) throws(RegistryError) -> AttestationRecord?
  /// Records (or replaces, for the same device) an activated attestation key; `.conflict` when
  /// the endorsement key is another device's.
  func setAttestation(_ record: AttestationRecord) throws(RegistryError)
  /// Forgets a device's TPM (an operator's step when its TPM was replaced).
  func removeAttestation(of device: String) throws(RegistryError)
  /// Whether an operator requires this device's keys to be attested.
  func attestationRequired(of device: String) throws(RegistryError) -> Bool
  /// Requires this device's keys to be attested from now on.
  func requireAttestation(of device: String) throws(RegistryError)
}

/// The registry in one SQLite file: WAL (an `edgekey-ra admin` process can read and write
/// while the RA runs), `synchronous=FULL` (a commit is on disk when it returns), created 0600.
public final class SQLiteRegistryStorage: DeviceRegistryStorage, @unchecked Sendable {
  // @unchecked: the connection is used only under `lock`.
  private let lock = Lock()
  private let db: SQLiteDatabase

  /// Opens (or creates) the database at `path`, and its schema.
  public init(path: String) throws(RegistryError) {
    do {
      db = try SQLiteDatabase(path: path, synchronous: "FULL")
      try db.execute(
        """
        CREATE TABLE IF NOT EXISTS devices(
          id TEXT PRIMARY KEY, state TEXT NOT NULL, method TEXT NOT NULL, secret TEXT,
          secret_used REAL, bootstrap_fingerprint TEXT UNIQUE, created REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS names(name TEXT PRIMARY KEY, device TEXT NOT NULL REFERENCES devices(id));
        CREATE INDEX IF NOT EXISTS names_device ON names(device);
        CREATE TABLE IF NOT EXISTS certificates(
          serial TEXT PRIMARY KEY, device TEXT NOT NULL REFERENCES devices(id), subject TEXT NOT NULL,
          not_before REAL NOT NULL, not_after REAL NOT NULL, fingerprint TEXT NOT NULL,
          key_fingerprint TEXT NOT NULL, issued REAL NOT NULL, operation TEXT NOT NULL,
          revoked REAL, reason TEXT);
        CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device);
        CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(revoked) WHERE revoked IS NOT NULL;
        CREATE TABLE IF NOT EXISTS audit(
          id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, device TEXT, event TEXT NOT NULL,
          detail TEXT NOT NULL, source TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS audit_device ON audit(device);
        CREATE TABLE IF NOT EXISTS reserved(pattern TEXT PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS external_revocations(serial TEXT PRIMARY KEY, revoked REAL NOT NULL, reason TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS attestation(
          device TEXT PRIMARY KEY REFERENCES devices(id), ek_fingerprint TEXT NOT NULL UNIQUE,
          ek_issuer TEXT NOT NULL, ak_name TEXT NOT NULL, ak_fingerprint TEXT NOT NULL,
          ak_serial TEXT NOT NULL, activated REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS attestation_required(device TEXT PRIMARY KEY REFERENCES devices(id));
        """)
    } catch {
      throw RegistryError(sqlite: error)
    }
  }

  /// Runs `body` in a read transaction.
  public func read<R>(_ body: (any RegistryTransaction) throws(RegistryError) -> R) throws(RegistryError) -> R {
    try lock.withLock { () throws(RegistryError) -> R in
      try db.readTransaction { () throws(RegistryError) -> R in try body(SQLiteRegistryTransaction(db: db)) }
    }
  }

  /// Runs `body` in a write transaction (BEGIN IMMEDIATE), fsync'd at commit.
  public func write<R>(_ body: (any RegistryTransaction) throws(RegistryError) -> R) throws(RegistryError) -> R {
    try lock.withLock { () throws(RegistryError) -> R in
      try db.transaction { () throws(RegistryError) -> R in try body(SQLiteRegistryTransaction(db: db)) }
    }
  }
}

private struct SQLiteRegistryTransaction: RegistryTransaction {
  let db: SQLiteDatabase

  private func rows(_ sql: String, _ values: [SQLiteValue] = []) throws(RegistryError) -> [[SQLiteValue]] {
    do { return try db.query(sql, values) } catch { throw RegistryError(sqlite: error) }
  }

  private static let deviceColumns = "id, state, method, secret_used, bootstrap_fingerprint, created"

  private func devices(where clause: String, _ values: [SQLiteValue]) throws(RegistryError) -> [DeviceRecord] {
    var found: [DeviceRecord] = []
    for row in try rows("SELECT \(Self.deviceColumns) FROM devices \(clause)", values) {
      let id = row[0].text ?? ""
      let names = try rows("SELECT name FROM names WHERE device = ? ORDER BY name", [.text(id)]).compactMap {
        $0[0].text
      }
      found.append(
        DeviceRecord(
          id: id, names: names, state: DeviceState(rawValue: row[1].text ?? "") ?? .revoked,
          method: EnrolmentMethod(rawValue: row[2].text ?? "") ?? .oneTimeSecret,
          bootstrapFingerprint: row[4].text, secretUsed: row[3].real.map(Date.init(timeIntervalSince1970:)),
          created: Date(timeIntervalSince1970: row[5].real ?? 0)))
    }
    return found
  }

  func device(_ id: String) throws(RegistryError) -> DeviceRecord? {
    try devices(where: "WHERE id = ?", [.text(id)]).first
  }

  func device(bootstrapFingerprint: String) throws(RegistryError) -> DeviceRecord? {
    try devices(where: "WHERE bootstrap_fingerprint = ?", [.text(bootstrapFingerprint)]).first
  }

  func holder(of name: String) throws(RegistryError) -> String? {
    try rows("SELECT device FROM names WHERE name = ?", [.text(name)]).first?[0].text
  }

  func devices() throws(RegistryError) -> [DeviceRecord] { try devices(where: "ORDER BY id", []) }

  func deviceCount() throws(RegistryError) -> Int {
    Int(try rows("SELECT count(*) FROM devices").first?[0].integer ?? 0)
  }

  func secretVerifier(of device: String) throws(RegistryError) -> String? {
    try rows("SELECT secret FROM devices WHERE id = ?", [.text(device)]).first?[0].text
  }

  func insert(_ device: DeviceRecord, secretVerifier: String?) throws(RegistryError) {
    if try self.device(device.id) != nil {
      throw RegistryError(.conflict, "device \(JSON.string(device.id)) is already registered")
    }
    for name in device.names {
      if let holder = try holder(of: name) {
        throw RegistryError(.conflict, "the name \(JSON.string(name)) is held by device \(JSON.string(holder))")
      }
    }
    _ = try rows(
      "INSERT INTO devices(id, state, method, secret, secret_used, bootstrap_fingerprint, created) VALUES(?,?,?,?,?,?,?)",
      [
        .text(device.id), .text(device.state.rawValue), .text(device.method.rawValue),
        secretVerifier.map(SQLiteValue.text) ?? .null,
        device.secretUsed.map { .real($0.timeIntervalSince1970) } ?? .null,
        device.bootstrapFingerprint.map(SQLiteValue.text) ?? .null, .real(device.created.timeIntervalSince1970),
      ])
    for name in device.names {
      _ = try rows("INSERT INTO names(name, device) VALUES(?, ?)", [.text(name), .text(device.id)])
    }
  }

  func setState(_ state: DeviceState, of device: String) throws(RegistryError) {
    _ = try rows("UPDATE devices SET state = ? WHERE id = ?", [.text(state.rawValue), .text(device)])
  }

  func setSecretUsed(_ at: Date, of device: String) throws(RegistryError) {
    _ = try rows("UPDATE devices SET secret_used = ? WHERE id = ?", [.real(at.timeIntervalSince1970), .text(device)])
  }

  func setSecret(_ verifier: String, of device: String) throws(RegistryError) {
    _ = try rows(
      "UPDATE devices SET secret = ?, secret_used = NULL, method = 'secret' WHERE id = ?",
      [.text(verifier), .text(device)])
  }

  func releaseNames(of device: String) throws(RegistryError) {
    _ = try rows("DELETE FROM names WHERE device = ?", [.text(device)])
  }

  private static let certificateColumns =
    "serial, device, subject, not_before, not_after, fingerprint, key_fingerprint, issued, operation, revoked, reason"

  private func certificates(where clause: String, _ values: [SQLiteValue]) throws(RegistryError)
    -> [CertificateRecord]
  {
    try rows("SELECT \(Self.certificateColumns) FROM certificates \(clause)", values).map { row in
      CertificateRecord(
        serial: row[0].text ?? "", device: row[1].text ?? "", subject: row[2].text ?? "",
        notBefore: Date(timeIntervalSince1970: row[3].real ?? 0),
        notAfter: Date(timeIntervalSince1970: row[4].real ?? 0), fingerprint: row[5].text ?? "",
        keyFingerprint: row[6].text ?? "", issued: Date(timeIntervalSince1970: row[7].real ?? 0),
        operation: row[8].text ?? "", revoked: row[9].real.map(Date.init(timeIntervalSince1970:)),
        reason: row[10].text.flatMap(RevocationReason.init(rawValue:)))
    }
  }

  func certificate(serial: String) throws(RegistryError) -> CertificateRecord? {
    try certificates(where: "WHERE serial = ?", [.text(serial)]).first
  }

  func certificates(of device: String) throws(RegistryError) -> [CertificateRecord] {
    try certificates(where: "WHERE device = ? ORDER BY issued", [.text(device)])
  }

  func revokedCertificates() throws(RegistryError) -> [CertificateRecord] {
    try certificates(where: "WHERE revoked IS NOT NULL ORDER BY revoked", [])
  }

  func insert(_ c: CertificateRecord) throws(RegistryError) {
    _ = try rows(
      "INSERT INTO certificates(\(Self.certificateColumns)) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
      [
        .text(c.serial), .text(c.device), .text(c.subject), .real(c.notBefore.timeIntervalSince1970),
        .real(c.notAfter.timeIntervalSince1970), .text(c.fingerprint), .text(c.keyFingerprint),
        .real(c.issued.timeIntervalSince1970), .text(c.operation),
        c.revoked.map { .real($0.timeIntervalSince1970) } ?? .null, c.reason.map { .text($0.rawValue) } ?? .null,
      ])
  }

  func revoke(serial: String, at: Date, reason: RevocationReason) throws(RegistryError) {
    _ = try rows(
      "UPDATE certificates SET revoked = ?, reason = ? WHERE serial = ? AND revoked IS NULL",
      [.real(at.timeIntervalSince1970), .text(reason.rawValue), .text(serial)])
  }

  func revokeExternal(serial: String, at: Date, reason: RevocationReason) throws(RegistryError) {
    _ = try rows(
      "INSERT OR IGNORE INTO external_revocations(serial, revoked, reason) VALUES(?,?,?)",
      [.text(serial), .real(at.timeIntervalSince1970), .text(reason.rawValue)])
  }

  func externalRevocations() throws(RegistryError) -> [CertificateRecord] {
    try rows("SELECT serial, revoked, reason FROM external_revocations ORDER BY revoked").map { row in
      CertificateRecord(
        serial: row[0].text ?? "", device: "-", subject: "", notBefore: .distantPast, notAfter: .distantFuture,
        fingerprint: "", keyFingerprint: "", issued: .distantPast, operation: "external",
        revoked: row[1].real.map(Date.init(timeIntervalSince1970:)),
        reason: row[2].text.flatMap(RevocationReason.init(rawValue:)))
    }
  }

  func append(_ e: AuditEntry) throws(RegistryError) {
    _ = try rows(
      "INSERT INTO audit(time, device, event, detail, source) VALUES(?,?,?,?,?)",
      [
        .real(e.time.timeIntervalSince1970), e.device.map(SQLiteValue.text) ?? .null, .text(e.event), .text(e.detail),
        .text(e.source),
      ])
  }

  func audit(device: String?, limit: Int) throws(RegistryError) -> [AuditEntry] {
    let clause = device == nil ? "" : "WHERE device = ?"
    let values: [SQLiteValue] = (device.map { [SQLiteValue.text($0)] } ?? []) + [.integer(Int64(limit))]
    return try rows(
      "SELECT time, device, event, detail, source FROM audit \(clause) ORDER BY id DESC LIMIT ?", values
    ).reversed().map { row in
      AuditEntry(
        time: Date(timeIntervalSince1970: row[0].real ?? 0), device: row[1].text, event: row[2].text ?? "",
        detail: row[3].text ?? "", source: row[4].text ?? "")
    }
  }

  func reserved() throws(RegistryError) -> [String] {
    try rows("SELECT pattern FROM reserved ORDER BY pattern").compactMap { $0[0].text }
  }

  func reserve(_ pattern: String) throws(RegistryError) {
    _ = try rows("INSERT OR IGNORE INTO reserved(pattern) VALUES(?)", [.text(pattern)])
  }

  func increment(_ counter: String) throws(RegistryError) -> Int64 {
    try rows(
      "INSERT INTO counters(name, value) VALUES(?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
      [.text(counter)]
    ).first?[0].integer ?? 0
  }

  func counter(_ counter: String) throws(RegistryError) -> Int64 {
    try rows("SELECT value FROM counters WHERE name = ?", [.text(counter)]).first?[0].integer ?? 0
  }

  private static let attestationColumns =
    "device, ek_fingerprint, ek_issuer, ak_name, ak_fingerprint, ak_serial, activated"

  private func attestations(where clause: String, _ values: [SQLiteValue]) throws(RegistryError)
    -> [AttestationRecord]
  {
    try rows("SELECT \(Self.attestationColumns) FROM attestation \(clause)", values).map { row in
      AttestationRecord(
        device: row[0].text ?? "", endorsementKeyFingerprint: row[1].text ?? "",
        endorsementKeyIssuer: row[2].text ?? "", attestationKeyName: row[3].text ?? "",
        attestationKeyFingerprint: row[4].text ?? "", attestationKeyCertificateSerial: row[5].text ?? "",
        activated: Date(timeIntervalSince1970: row[6].real ?? 0))
    }
  }

  func attestation(of device: String) throws(RegistryError) -> AttestationRecord? {
    try attestations(where: "WHERE device = ?", [.text(device)]).first
  }

  func attestation(endorsementKey fingerprint: String) throws(RegistryError) -> AttestationRecord? {
    try attestations(where: "WHERE ek_fingerprint = ?", [.text(fingerprint)]).first
  }

  func setAttestation(_ r: AttestationRecord) throws(RegistryError) {
    if let other = try attestation(endorsementKey: r.endorsementKeyFingerprint), other.device != r.device {
      throw RegistryError(.conflict, "the endorsement key is device \(JSON.string(other.device))'s")
    }
    _ = try rows(
      "INSERT OR REPLACE INTO attestation(\(Self.attestationColumns)) VALUES(?,?,?,?,?,?,?)",
      [
        .text(r.device), .text(r.endorsementKeyFingerprint), .text(r.endorsementKeyIssuer),
        .text(r.attestationKeyName), .text(r.attestationKeyFingerprint), .text(r.attestationKeyCertificateSerial),
        .real(r.activated.timeIntervalSince1970),
      ])
  }

  func removeAttestation(of device: String) throws(RegistryError) {
    _ = try rows("DELETE FROM attestation WHERE device = ?", [.text(device)])
  }

  func attestationRequired(of device: String) throws(RegistryError) -> Bool {
    try !rows("SELECT 1 FROM attestation_required WHERE device = ?", [.text(device)]).isEmpty
  }

  func requireAttestation(of device: String) throws(RegistryError) {
    _ = try rows("INSERT OR IGNORE INTO attestation_required(device) VALUES(?)", [.text(device)])
  }
}
