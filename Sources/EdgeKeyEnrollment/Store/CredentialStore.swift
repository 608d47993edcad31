import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM

#if canImport(Glibc)
  import Glibc
#endif

/// The device's credentials on disk, in a state directory of its own (0700, files 0600):
///
/// - `current.pem`: the credential in use (key reference + chain).
/// - `next.pem`: a renewal under way: the new key alone (the request is out), or key + chain
///   (issued, not yet switched to).
/// - `previous.pem`: the credential `current.pem` replaced, kept until the new one has been
///   used in a successful handshake, then deleted (which retires its key: the wrapped blob
///   is the only way to load it).
/// - `bootstrap.pem`: the factory (manufacturer) credential, for first enrollment and for
///   when the operational one has expired.
/// - `anchors.pem`: the trust anchors learnt from the enrollment server (`cacerts`).
///
/// Every file is replaced whole: temporary file, fsync, rename, fsync of the directory. Key
/// and certificate live in one file, so one rename switches both; `current.pem` is replaced,
/// never removed. Killed at any instant, the store holds a working, matching credential: the
/// old or the new. `open` finishes a switch that was cut short.
public final class CredentialStore: @unchecked Sendable {
  /// The state directory.
  public let directory: String

  /// The credentials a device holds at once.
  public enum Slot: String, Sendable, CaseIterable {
    /// `current`: in use. `next`: issued, not yet switched to. `previous`: kept until `current` has
    /// worked. `bootstrap`: the factory identity for a first or fallback enrollment.
    case current, next, previous, bootstrap
    var file: String { "\(rawValue).pem" }
  }

  /// What `open` found and repaired.
  public struct Recovery: Sendable, Equatable {
    /// A renewal had an issued credential in `next.pem` that was not switched to yet: done now.
    public var finishedSwitch = false
    /// Temporary files of writes that were cut short, removed.
    public var removedTemporaryFiles = 0
  }

  /// What opening the store found and repaired.
  public private(set) var recovery = Recovery()

  /// Opens (creating it 0700 if missing) the state directory and finishes an interrupted switch.
  public init(directory: String) throws(EnrollmentError) {
    self.directory = directory.hasSuffix("/") && directory.count > 1 ? String(directory.dropLast()) : directory
    do {
      try AtomicFile.makeDirectory(self.directory, mode: 0o700)
    } catch {
      throw EnrollmentError(.storage, "state directory: \(error)")
    }
    var info = stat()
    guard stat(self.directory, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
      throw EnrollmentError(.storage, "\(self.directory) is not a directory")
    }
    if info.st_mode & 0o077 != 0, chmod(self.directory, 0o700) != 0 {
      throw EnrollmentError(.storage, "\(self.directory) is open to other users and cannot be made 0700")
    }
    try recover()
  }

  /// The file of `slot`.
  public func path(_ slot: Slot) -> String { "\(directory)/\(slot.file)" }
  /// The trust anchors' file.
  public var anchorsPath: String { "\(directory)/anchors.pem" }

  // MARK: - Reading

  /// The credential in a slot, or nil when the slot is empty. A file that is there but does not
  /// parse, or whose certificate is not for its key, is an error: nothing is thrown away.
  public func read(_ slot: Slot) throws(EnrollmentError) -> Credential? {
    guard let text = try readText(path(slot)) else { return nil }
    return try Credential(pem: text, origin: path(slot))
  }

  /// The trust anchors learnt from the server (empty before the first `cacerts`).
  public func anchors() throws(EnrollmentError) -> [Certificate] {
    guard let text = try readText(anchorsPath), text.contains("-----BEGIN CERTIFICATE-----") else { return [] }
    do { return try Certificate.chain(pem: text) } catch {
      throw EnrollmentError(.storage, "\(anchorsPath): \(error.reason)")
    }
  }

  // MARK: - Writing

  /// Replaces a slot atomically.
  public func write(_ credential: Credential, to slot: Slot) throws(EnrollmentError) {
    try writeText(credential.pem, to: path(slot))
  }

  /// Replaces the stored trust anchors, atomically and durably.
  public func saveAnchors(_ anchors: [Certificate]) throws(EnrollmentError) {
    try writeText(anchors.map(\.pem).joined(), to: anchorsPath)
  }

  /// Empties a slot (and syncs the directory). Not allowed for `current`, which is only ever
  /// replaced.
  public func remove(_ slot: Slot) throws(EnrollmentError) {
    precondition(slot != .current, "current.pem is replaced, never removed")
    if unlink(path(slot)) != 0 && errno != ENOENT {
      throw EnrollmentError(.storage, "remove \(path(slot)): \(String(cString: strerror(errno)))")
    }
    try syncDirectory()
  }

  /// Switches to the issued credential in `next.pem`: the current one is kept as `previous.pem`
  /// (until `retirePrevious`), then `next.pem` is renamed over `current.pem`. Each step is
  /// atomic and the sequence can be repeated after a crash at any point.
  public func promoteNext() throws(EnrollmentError) {
    guard let next = try read(.next), next.isComplete else {
      throw EnrollmentError(.storage, "\(path(.next)) holds no issued credential to switch to")
    }
    if let current = try readText(path(.current)), current != next.pem {
      try writeText(current, to: path(.previous))
    }
    guard rename(path(.next), path(.current)) == 0 else {
      throw EnrollmentError(.storage, "rename \(path(.next)): \(String(cString: strerror(errno)))")
    }
    try syncDirectory()
  }

  /// Returns to `previous.pem` (the new credential was refused where it is used). The refused
  /// one is dropped.
  public func rollBack() throws(EnrollmentError) {
    guard let previous = try readText(path(.previous)) else {
      throw EnrollmentError(.storage, "there is no previous credential to return to")
    }
    try writeText(previous, to: path(.current))
    try remove(.previous)
  }

  /// Deletes `previous.pem` once the current credential has proven itself; returns the key it
  /// held (to flush if loaded), or nil if there was none.
  @discardableResult
  public func retirePrevious() throws(EnrollmentError) -> TSS2PrivateKey? {
    // A damaged previous.pem is of no use either: it goes too.
    guard let previous = try? read(.previous) else {
      try remove(.previous)
      return nil
    }
    let current = try read(.current)
    try remove(.previous)
    // The same key kept across a renewal without rotation is not retired.
    return previous.key == current?.key ? nil : previous.key
  }

  // MARK: - Recovery

  private func recover() throws(EnrollmentError) {
    // Temporary files of AtomicFile writes that never got renamed.
    if let dir = opendir(directory) {
      defer { closedir(dir) }
      while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
          String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name.contains(".pem.tmp-") && unlink("\(directory)/\(name)") == 0 {
          recovery.removedTemporaryFiles += 1
        }
      }
    }
    // An issued credential that was not switched to yet (killed between saving and switching).
    if let next = try? read(.next), next.isComplete {
      let current = try? read(.current)
      if current?.certificate?.der != next.certificate?.der {
        try promoteNext()
        recovery.finishedSwitch = true
      } else {
        try remove(.next)
      }
    }
  }

  // MARK: - Files

  func readText(_ path: String) throws(EnrollmentError) -> String? {
    do {
      return String(decoding: try AtomicFile.read(path, limit: 1 << 20), as: UTF8.self)
    } catch {
      if error.errno == ENOENT { return nil }
      throw EnrollmentError(.storage, "\(error)")
    }
  }

  func writeText(_ text: String, to path: String) throws(EnrollmentError) {
    do { try AtomicFile.write(Array(text.utf8), to: path, mode: 0o600) } catch {
      throw EnrollmentError(.storage, "\(error)")
    }
  }

  private func syncDirectory() throws(EnrollmentError) {
    do { try AtomicFile.syncDirectory(directory) } catch { throw EnrollmentError(.storage, "\(error)") }
  }
}
