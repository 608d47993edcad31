#if canImport(Glibc)
  import Glibc
#endif

/// Exclusive use of a state directory by one long-running process (an agent): `agent.lock`,
/// held with `flock` for the lock's lifetime and released by the kernel when the process dies,
/// so a crashed agent never blocks the next one. It holds the holder's pid, for the message.
///
/// Two agents on one state directory would renew over each other and evict each other's TPM
/// keys (three slots on a TPM without a resource manager); the second is refused at start.
public final class StateLock: @unchecked Sendable {
  // @unchecked: the descriptor is written once in init and closed once in deinit.
  private let descriptor: Int32
  /// The lock file.
  public let path: String

  /// Takes the lock on `store`'s directory, or throws `.storage` naming the process that holds it.
  public init(_ store: CredentialStore) throws(EnrollmentError) {
    path = store.directory + "/agent.lock"
    let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
    guard fd >= 0 else {
      throw EnrollmentError(.storage, "cannot open \(path): \(String(cString: strerror(errno)))")
    }
    guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
      let busy = errno == EWOULDBLOCK
      var buffer = [UInt8](repeating: 0, count: 32)
      let n = read(fd, &buffer, buffer.count)
      close(fd)
      let holder = n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self).filter(\.isNumber) : ""
      throw EnrollmentError(
        .storage,
        busy
          ? "another edgekey agent\(holder.isEmpty ? "" : " (pid \(holder))") already uses \(store.directory): "
            + "one agent per state directory"
          : "cannot lock \(path): \(String(cString: strerror(errno)))")
    }
    ftruncate(fd, 0)
    let pid = Array("\(getpid())\n".utf8)
    _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
    descriptor = fd
  }

  deinit { close(descriptor) }
}
