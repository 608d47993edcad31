internal import CSQLite

#if canImport(Glibc)
  import Glibc
#endif

/// A failure of an SQLite database, with what was being done and SQLite's own text.
package struct SQLiteError: Error, Sendable, CustomStringConvertible {
  /// SQLite's primary result code (`SQLITE_FULL`, `SQLITE_CONSTRAINT`, ...).
  package var code: Int32
  package var operation: String
  package var message: String

  package var isDiskFull: Bool { code == SQLITE_FULL }
  /// A UNIQUE, PRIMARY KEY or CHECK constraint refused the write (nothing was written).
  package var isConstraint: Bool { code == SQLITE_CONSTRAINT }
  package var description: String { "\(operation): \(message)" }
}

/// A value bound to a statement's parameter or read from a column.
package enum SQLiteValue: Sendable, Equatable {
  case null
  case integer(Int64)
  case real(Double)
  case text(String)
  case blob([UInt8])
}

/// One SQLite connection, owned: `deinit` finalizes its statements and closes it. Not
/// thread-safe by itself; its owner serialises access (a `Lock`).
package final class SQLiteDatabase {
  private let db: OpaquePointer
  package let path: String
  private var cache: [String: OpaquePointer] = [:]

  /// Opens (or creates, 0600, in a 0700 directory made if missing) the database at `path`,
  /// in WAL mode with `synchronous`: "FULL" fsyncs every commit.
  package init(path: String, synchronous: String = "FULL", exclusive: Bool = false) throws(SQLiteError) {
    self.path = path
    // The directories that are missing, made 0700 from the outermost in.
    var missing: [String] = []
    var directory = AtomicFile.parentDirectory(of: path)
    while !directory.isEmpty && directory != "/" && access(directory, F_OK) != 0 {
      missing.append(directory)
      directory = AtomicFile.parentDirectory(of: directory)
    }
    for d in missing.reversed() where mkdir(d, 0o700) != 0 && errno != EEXIST {
      throw SQLiteError(code: SQLITE_CANTOPEN, operation: "create \(d)", message: String(cString: strerror(errno)))
    }
    let old = umask(0o077)
    var handle: OpaquePointer?
    let rc = sqlite3_open_v2(path, &handle, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
    umask(old)
    guard rc == SQLITE_OK, let handle else {
      let text = handle.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(rc))
      sqlite3_close(handle)
      throw SQLiteError(code: rc & 0xff, operation: "open \(path)", message: text)
    }
    db = handle
    sqlite3_busy_timeout(db, 10_000)
    sqlite3_extended_result_codes(db, 1)
    do throws(SQLiteError) {
      if exclusive { try execute("PRAGMA locking_mode=EXCLUSIVE") }
      try execute("PRAGMA journal_mode=WAL")
      try execute("PRAGMA synchronous=\(synchronous)")
      try execute("PRAGMA foreign_keys=ON")
      let check = try scalar("PRAGMA quick_check")
      guard check == .text("ok") else {
        throw SQLiteError(
          code: SQLITE_CORRUPT, operation: "check \(path)", message: "damaged (\(check)); it was left as it is")
      }
    } catch {
      sqlite3_close_v2(db)
      throw error
    }
  }

  deinit {
    for s in cache.values { sqlite3_finalize(s) }
    sqlite3_close_v2(db)
  }

  /// Runs SQL that returns no rows (several statements allowed).
  package func execute(_ sql: String) throws(SQLiteError) {
    guard sqlite3_exec(db, sql, nil, nil, nil) == SQLITE_OK else { throw failure(sql) }
  }

  /// Runs one statement with `values` bound to its `?` parameters, and returns its rows.
  @discardableResult
  package func query(_ sql: String, _ values: [SQLiteValue] = []) throws(SQLiteError) -> [[SQLiteValue]] {
    let s = try statement(sql)
    defer {
      sqlite3_reset(s)
      sqlite3_clear_bindings(s)
    }
    for (i, value) in values.enumerated() {
      let index = Int32(i + 1)
      let rc: Int32
      switch value {
      case .null: rc = sqlite3_bind_null(s, index)
      case .integer(let v): rc = sqlite3_bind_int64(s, index, v)
      case .real(let v): rc = sqlite3_bind_double(s, index, v)
      case .text(let v): rc = sqlite3_bind_text(s, index, v, -1, edgekey_sqlite_transient())
      case .blob(let v):
        rc = v.withUnsafeBytes {
          sqlite3_bind_blob(
            s, index, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32($0.count), edgekey_sqlite_transient())
        }
      }
      guard rc == SQLITE_OK else { throw failure(sql) }
    }
    var rows: [[SQLiteValue]] = []
    while true {
      let rc = sqlite3_step(s)
      if rc == SQLITE_DONE { return rows }
      guard rc == SQLITE_ROW else { throw failure(sql) }
      rows.append((0..<sqlite3_column_count(s)).map { column(s, $0) })
    }
  }

  /// The first column of the first row, or `.null`.
  package func scalar(_ sql: String, _ values: [SQLiteValue] = []) throws(SQLiteError) -> SQLiteValue {
    try query(sql, values).first?.first ?? .null
  }

  /// The rowid of the last INSERT on this connection.
  package var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(db) }

  /// Runs `body` in one write transaction (BEGIN IMMEDIATE: the write lock is taken first,
  /// so two writers never both read then conflict); rolled back if `body` throws. A database
  /// failure of the BEGIN or COMMIT is thrown as `E(sqlite:)`.
  package func transaction<R, E: SQLiteWrapping>(_ body: () throws(E) -> R) throws(E) -> R {
    do { try execute("BEGIN IMMEDIATE") } catch { throw E(sqlite: error) }
    let result: R
    do throws(E) {
      result = try body()
    } catch {
      try? execute("ROLLBACK")
      throw error
    }
    do { try execute("COMMIT") } catch {
      try? execute("ROLLBACK")
      throw E(sqlite: error)
    }
    return result
  }

  /// Runs `body` in one read transaction: every query in it sees the same snapshot, also
  /// while another process writes.
  package func readTransaction<R, E: SQLiteWrapping>(_ body: () throws(E) -> R) throws(E) -> R {
    do { try execute("BEGIN DEFERRED") } catch { throw E(sqlite: error) }
    defer { try? execute("COMMIT") }
    return try body()
  }

  private func statement(_ sql: String) throws(SQLiteError) -> OpaquePointer {
    if let cached = cache[sql] { return cached }
    var s: OpaquePointer?
    guard sqlite3_prepare_v2(db, sql, -1, &s, nil) == SQLITE_OK, let s else { throw failure(sql) }
    cache[sql] = s
    return s
  }

  private func column(_ s: OpaquePointer, _ i: Int32) -> SQLiteValue {
    switch sqlite3_column_type(s, i) {
    case SQLITE_INTEGER: return .integer(sqlite3_column_int64(s, i))
    case SQLITE_FLOAT: return .real(sqlite3_column_double(s, i))
    case SQLITE_TEXT:
      let count = Int(sqlite3_column_bytes(s, i))
      guard let p = sqlite3_column_text(s, i) else { return .text("") }
      return .text(String(decoding: UnsafeBufferPointer(start: p, count: count), as: UTF8.self))
    case SQLITE_BLOB:
      let count = Int(sqlite3_column_bytes(s, i))
      guard let p = sqlite3_column_blob(s, i) else { return .blob([]) }
      return .blob(Array(UnsafeRawBufferPointer(start: p, count: count)))
    default: return .null
    }
  }

  private func failure(_ what: String) -> SQLiteError {
    let code = sqlite3_extended_errcode(db) & 0xff
    var message = String(cString: sqlite3_errmsg(db))
    if code == SQLITE_FULL { message += " (the disk is full; nothing was changed)" }
    return SQLiteError(code: code, operation: "\(path): \(what.prefix(80))", message: message)
  }
}

/// An error type that can carry a database failure (so that `SQLiteDatabase.transaction`
/// can report one inside a body that throws it).
package protocol SQLiteWrapping: Error {
  init(sqlite: SQLiteError)
}

extension SQLiteError: SQLiteWrapping {
  package init(sqlite: SQLiteError) { self = sqlite }
}

extension SQLiteValue {
  package var text: String? { if case .text(let v) = self { v } else { nil } }
  package var integer: Int64? { if case .integer(let v) = self { v } else { nil } }
  package var real: Double? {
    switch self {
    case .real(let v): v
    case .integer(let v): Double(v)
    default: nil
    }
  }
  package var blob: [UInt8]? { if case .blob(let v) = self { v } else { nil } }
}
