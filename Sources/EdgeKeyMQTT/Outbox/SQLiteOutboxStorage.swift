import CSQLite
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// The outbox's SQLite database: one table, WAL mode, prepared statements.
final class SQLiteOutboxStorage: OutboxStorage {
  private let db: OpaquePointer
  private let path: String
  private var insert: OpaquePointer?
  private var select: OpaquePointer?
  private var delete: OpaquePointer?
  private let durableSynchronous: String

  init(path: String, durability: OutboxDurability) throws(MQTTError) {
    self.path = path
    durableSynchronous = durability == .powerSafe ? "FULL" : "NORMAL"
    let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
    if !directory.isEmpty && !FileManager.default.fileExists(atPath: directory) {
      do {
        try FileManager.default.createDirectory(
          atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
      } catch {
        throw MQTTError(kind: .outbox, reason: "cannot create the outbox's directory \(directory): \(error)")
      }
    }
    // Created 0600: messages are the device's data.
    let old = umask(0o077)
    var handle: OpaquePointer?
    let rc = sqlite3_open_v2(path, &handle, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
    umask(old)
    guard rc == SQLITE_OK, let handle else {
      let text = handle.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(rc))
      sqlite3_close(handle)
      throw MQTTError(kind: .outbox, reason: "cannot open the outbox \(path): \(text)")
    }
    db = handle
    sqlite3_busy_timeout(db, 5000)
    do throws(MQTTError) {
      // A second process on the same file would deliver the same messages twice.
      try exec("PRAGMA locking_mode=EXCLUSIVE")
      try exec("PRAGMA journal_mode=WAL")
      try exec("PRAGMA synchronous=\(durableSynchronous)")
      let check = try scalarText("PRAGMA quick_check")
      guard check == "ok" else {
        throw MQTTError(kind: .outbox, reason: "the outbox \(path) is damaged (\(check)); it was left as it is")
      }
      try exec(
        """
        CREATE TABLE IF NOT EXISTS outbox(
          id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
          qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL, expires REAL)
        """)
      insert = try prepare("INSERT INTO outbox(topic, payload, qos, retain, created, expires) VALUES(?,?,?,?,?,?)")
      select = try prepare(
        "SELECT id, topic, payload, qos, retain, created, expires FROM outbox WHERE id > ? ORDER BY id LIMIT ?")
      delete = try prepare("DELETE FROM outbox WHERE id = ? RETURNING length(CAST(topic AS BLOB)) + length(payload)")
    } catch {
      finalize()
      throw error
    }
  }

  deinit { finalize() }

  private func finalize() {
    for s in [insert, select, delete] { sqlite3_finalize(s) }
    insert = nil
    select = nil
    delete = nil
    sqlite3_close_v2(db)
  }

  /// Messages and bytes stored (at open).
  func totals() throws(MQTTError) -> (Int, Int) {
    let s = try prepare("SELECT count(*), coalesce(sum(length(CAST(topic AS BLOB)) + length(payload)), 0) FROM outbox")
    defer { sqlite3_finalize(s) }
    guard sqlite3_step(s) == SQLITE_ROW else { throw failure("counting the outbox") }
    return (Int(sqlite3_column_int64(s, 0)), Int(sqlite3_column_int64(s, 1)))
  }

  func append(_ messages: [OutboxMessage]) throws(MQTTError) -> [OutboxMessage] {
    try transaction(durable: true) { () throws(MQTTError) -> [OutboxMessage] in
      var stored: [OutboxMessage] = []
      for var m in messages {
        sqlite3_reset(insert)
        sqlite3_bind_text(insert, 1, m.topic, -1, edgekey_sqlite_transient())
        _ = m.payload.withUnsafeBytes {
          sqlite3_bind_blob(
            insert, 2, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32($0.count),
            edgekey_sqlite_transient())
        }
        sqlite3_bind_int(insert, 3, m.qos.rawValue)
        sqlite3_bind_int(insert, 4, m.retain ? 1 : 0)
        sqlite3_bind_double(insert, 5, m.created.timeIntervalSince1970)
        if let e = m.expires {
          sqlite3_bind_double(insert, 6, e.timeIntervalSince1970)
        } else {
          sqlite3_bind_null(insert, 6)
        }
        guard sqlite3_step(insert) == SQLITE_DONE else { throw failure("storing a message") }
        m.id = sqlite3_last_insert_rowid(db)
        stored.append(m)
      }
      return stored
    }
  }

  func next(after id: Int64, limit: Int) throws(MQTTError) -> [OutboxMessage] {
    sqlite3_reset(select)
    sqlite3_bind_int64(select, 1, id)
    sqlite3_bind_int64(select, 2, Int64(limit))
    var found: [OutboxMessage] = []
    while true {
      let rc = sqlite3_step(select)
      if rc == SQLITE_DONE { break }
      guard rc == SQLITE_ROW else { throw failure("reading the outbox") }
      let topic = String(cString: sqlite3_column_text(select, 1))
      let count = Int(sqlite3_column_bytes(select, 2))
      let payload = sqlite3_column_blob(select, 2).map { Array(UnsafeRawBufferPointer(start: $0, count: count)) } ?? []
      found.append(
        OutboxMessage(
          id: sqlite3_column_int64(select, 0), topic: topic, payload: payload,
          qos: MQTTQoS(rawValue: sqlite3_column_int(select, 3)) ?? .atLeastOnce,
          retain: sqlite3_column_int(select, 4) != 0,
          created: Date(timeIntervalSince1970: sqlite3_column_double(select, 5)),
          expires: sqlite3_column_type(select, 6) == SQLITE_NULL
            ? nil : Date(timeIntervalSince1970: sqlite3_column_double(select, 6))))
    }
    sqlite3_reset(select)
    return found
  }

  func oldest(freeing count: Int, bytes: Int) throws(MQTTError) -> [OutboxMessage] {
    var found: [OutboxMessage] = []
    var freed = 0
    var after: Int64 = 0
    while found.count < count || freed < bytes {
      let batch = try next(after: after, limit: 256)
      if batch.isEmpty { break }
      for m in batch where found.count < count || freed < bytes {
        found.append(m)
        freed += m.size
      }
      after = batch.last!.id
    }
    return found
  }

  @discardableResult
  func remove(_ ids: [Int64], durable: Bool) throws(MQTTError) -> (count: Int, size: Int) {
    try transaction(durable: durable) { () throws(MQTTError) -> (Int, Int) in
      var count = 0
      var size = 0
      for id in ids {
        sqlite3_reset(delete)
        sqlite3_bind_int64(delete, 1, id)
        var rc = sqlite3_step(delete)
        while rc == SQLITE_ROW {
          count += 1
          size += Int(sqlite3_column_int64(delete, 0))
          rc = sqlite3_step(delete)
        }
        guard rc == SQLITE_DONE else { throw failure("removing an acknowledged message") }
      }
      sqlite3_reset(delete)
      return (count, size)
    }
  }

  // MARK: - SQLite plumbing

  /// One transaction; a non-durable one is committed without an fsync (WAL, synchronous=OFF).
  private func transaction<R>(durable: Bool, _ body: () throws(MQTTError) -> R) throws(MQTTError) -> R {
    if !durable { try exec("PRAGMA synchronous=OFF") }
    defer { if !durable { try? exec("PRAGMA synchronous=\(durableSynchronous)") } }
    try exec("BEGIN IMMEDIATE")
    do throws(MQTTError) {
      let result = try body()
      try exec("COMMIT")
      return result
    } catch {
      try? exec("ROLLBACK")
      throw error
    }
  }

  private func exec(_ sql: String) throws(MQTTError) {
    guard sqlite3_exec(db, sql, nil, nil, nil) == SQLITE_OK else { throw failure(sql) }
  }

  private func scalarText(_ sql: String) throws(MQTTError) -> String {
    let s = try prepare(sql)
    defer { sqlite3_finalize(s) }
    guard sqlite3_step(s) == SQLITE_ROW, let text = sqlite3_column_text(s, 0) else { throw failure(sql) }
    return String(cString: text)
  }

  private func prepare(_ sql: String) throws(MQTTError) -> OpaquePointer {
    var s: OpaquePointer?
    guard sqlite3_prepare_v2(db, sql, -1, &s, nil) == SQLITE_OK, let s else { throw failure(sql) }
    return s
  }

  private func failure(_ what: String) -> MQTTError {
    let code = sqlite3_extended_errcode(db)
    var reason = "outbox \(path): \(what): \(String(cString: sqlite3_errmsg(db)))"
    if code & 0xff == SQLITE_FULL { reason += " (the disk is full; the outbox is unchanged)" }
    return MQTTError(kind: code & 0xff == SQLITE_FULL ? .diskFull : .outbox, reason: reason)
  }
}
