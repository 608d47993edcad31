import EdgeKeyCore
import FoundationEssentials

/// The outbox's SQLite database: one table, WAL mode, statements prepared once (EdgeKeyCore's
/// `SQLiteDatabase`, as the RA's registry uses).
final class SQLiteOutboxStorage: OutboxStorage {
  private let db: SQLiteDatabase
  private let path: String
  private let durableSynchronous: String

  init(path: String, durability: OutboxDurability) throws(MQTTError) {
    self.path = path
    durableSynchronous = durability == .powerSafe ? "FULL" : "NORMAL"
    do {
      // Exclusive: a second process on the same file would deliver the same messages twice.
      // Created 0600 (in a 0700 directory): messages are the device's data.
      db = try SQLiteDatabase(path: path, synchronous: durableSynchronous, exclusive: true)
      try db.execute(
        """
        CREATE TABLE IF NOT EXISTS outbox(
          id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
          qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL, expires REAL)
        """)
    } catch {
      throw Self.failure(error, "cannot open the outbox", path: path)
    }
  }

  /// Messages and bytes stored (at open).
  func totals() throws(MQTTError) -> (Int, Int) {
    do {
      let row = try db.query(
        "SELECT count(*), coalesce(sum(length(CAST(topic AS BLOB)) + length(payload)), 0) FROM outbox"
      ).first
      return (Int(row?[0].integer ?? 0), Int(row?[1].integer ?? 0))
    } catch {
      throw failure(error, "counting the outbox")
    }
  }

  func lastID() throws(MQTTError) -> Int64 {
    do {
      return try db.query("SELECT coalesce(max(id), 0) FROM outbox").first?[0].integer ?? 0
    } catch {
      throw failure(error, "reading the outbox")
    }
  }

  func append(_ messages: [OutboxMessage], removing ids: [Int64]) throws(MQTTError) -> (
    stored: [OutboxMessage], removed: (count: Int, size: Int)
  ) {
    try transaction(durable: true, "storing a message") {
      () throws(SQLiteError) -> ([OutboxMessage], (count: Int, size: Int)) in
      let removed = try delete(ids)
      var stored: [OutboxMessage] = []
      for var m in messages {
        try db.query(
          "INSERT INTO outbox(topic, payload, qos, retain, created, expires) VALUES(?,?,?,?,?,?)",
          [
            .text(m.topic), .blob(m.payload), .integer(Int64(m.qos.rawValue)), .integer(m.retain ? 1 : 0),
            .real(m.created.timeIntervalSince1970), m.expires.map { .real($0.timeIntervalSince1970) } ?? .null,
          ])
        m.id = db.lastInsertRowID
        stored.append(m)
      }
      return (stored, removed)
    }
  }

  func next(after id: Int64, limit: Int) throws(MQTTError) -> [OutboxMessage] {
    let rows: [[SQLiteValue]]
    do {
      rows = try db.query(
        "SELECT id, topic, payload, qos, retain, created, expires FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
        [.integer(id), .integer(Int64(limit))])
    } catch {
      throw failure(error, "reading the outbox")
    }
    return rows.map { row in
      OutboxMessage(
        id: row[0].integer ?? 0, topic: row[1].text ?? "", payload: row[2].blob ?? [],
        qos: MQTTQoS(rawValue: Int32(row[3].integer ?? 1)) ?? .atLeastOnce, retain: row[4].integer != 0,
        created: Date(timeIntervalSince1970: row[5].real ?? 0),
        expires: row[6].real.map(Date.init(timeIntervalSince1970:)))
    }
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
    try transaction(durable: durable, "removing an acknowledged message") { () throws(SQLiteError) in try delete(ids) }
  }

  /// Deletes the rows of `ids` (inside a transaction); how many there were and their size.
  private func delete(_ ids: [Int64]) throws(SQLiteError) -> (count: Int, size: Int) {
    var count = 0
    var size = 0
    for id in ids {
      for row in try db.query(
        "DELETE FROM outbox WHERE id = ? RETURNING length(CAST(topic AS BLOB)) + length(payload)", [.integer(id)])
      {
        count += 1
        size += Int(row[0].integer ?? 0)
      }
    }
    return (count, size)
  }

  /// One transaction; a non-durable one is committed without an fsync (WAL, synchronous=OFF).
  private func transaction<R>(durable: Bool, _ what: String, _ body: () throws(SQLiteError) -> R) throws(MQTTError)
    -> R
  {
    do {
      if !durable { try db.execute("PRAGMA synchronous=OFF") }
      defer { if !durable { try? db.execute("PRAGMA synchronous=\(durableSynchronous)") } }
      return try db.transaction(body)
    } catch {
      throw failure(error, what)
    }
  }

  private func failure(_ error: SQLiteError, _ what: String) -> MQTTError {
    Self.failure(error, what, path: path)
  }

  private static func failure(_ error: SQLiteError, _ what: String, path: String) -> MQTTError {
    let reason = "outbox \(path): \(what): \(error.message)"
    return MQTTError(kind: error.isDiskFull ? .diskFull : .outbox, reason: reason)
  }
}
