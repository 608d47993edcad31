import CEdgeKeyTestHelpers
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A character device for tpm2-tss's `device` TCTI, backed by a swtpm: a pseudo-terminal in raw
/// mode whose far end relays each TPM command to the swtpm and writes the response back.
///
/// CI machines have no /dev/tpmrm0 and no CUSE (swtpm's own character device), yet the device
/// TCTI is what real boards use; this gives it a file to open, write and poll. The relay
/// stands in for the kernel driver only: the TPM is the real swtpm. ``pause()`` stops relaying,
/// so a command written to the device gets no answer, as with a chip that hangs.
public final class DeviceNode: @unchecked Sendable {
  // @unchecked: `paused` and `master` are shared with the relay thread under `lock`.
  /// The TCTI string for EdgeKey: `device:/dev/pts/N`.
  public let tcti: String
  private let master: Int32
  private let slave: Int32
  private let swtpmPort: UInt16
  private let lock = NSCondition()
  private var paused = false
  private var stopped = false

  public init(over swtpm: SoftwareTPM) throws {
    swtpmPort = swtpm.port
    var name = [CChar](repeating: 0, count: 128)
    let m = edgekey_test_open_pty(&name, name.count)
    guard m >= 0 else { throw HarnessError("no pseudo-terminal") }
    let path = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    // Kept open by the harness so that the master never sees a hang-up between TCTI sessions.
    let s = open(path, O_RDWR | O_NOCTTY)
    guard s >= 0 else { throw HarnessError("cannot open \(path)") }
    var raw = termios()
    tcgetattr(s, &raw)
    cfmakeraw(&raw)
    tcsetattr(s, TCSANOW, &raw)
    master = m
    slave = s
    tcti = "device:\(path)"
    let thread = Thread { [self] in relay() }
    thread.name = "device-node relay"
    thread.start()
  }

  deinit {
    close(slave)
    close(master)
  }

  /// Stops the relay thread (it ends within 50 ms) and closes the device.
  public func stop() {
    lock.lock()
    stopped = true
    lock.broadcast()
    lock.unlock()
  }

  /// Stops answering: commands wait in the device until ``resume()``.
  public func pause() {
    lock.lock()
    paused = true
    lock.unlock()
  }

  /// Answers again. Commands written while paused were given up by their callers (their
  /// contexts discarded): they are thrown away, not answered late into a new session.
  public func resume() {
    lock.lock()
    tcflush(master, TCIOFLUSH)
    paused = false
    lock.broadcast()
    lock.unlock()
  }

  private func relay() {
    while true {
      lock.lock()
      while paused && !stopped { lock.wait() }
      if stopped {
        lock.unlock()
        return
      }
      lock.unlock()
      var fds = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
      guard poll(&fds, 1, 50) > 0, fds.revents & Int16(POLLIN) != 0 else { continue }
      // Read and answer under the lock, so that resume() never flushes half a command.
      lock.lock()
      defer { lock.unlock() }
      if paused { continue }
      guard let command = readCommand(), let response = try? forward(command) else { continue }
      _ = response.withUnsafeBytes { write(master, $0.baseAddress, $0.count) }
    }
  }

  private func readCommand() -> [UInt8]? {
    guard let header = readExactly(master, 10) else { return nil }
    let size = Int(header[2]) << 24 | Int(header[3]) << 16 | Int(header[4]) << 8 | Int(header[5])
    guard size >= 10, size <= 4096 else { return nil }
    guard let body = readExactly(master, size - 10) else { return nil }
    return header + body
  }

  private func forward(_ command: [UInt8]) throws -> [UInt8] {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw HarnessError("socket") }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = swtpmPort.bigEndian
    let connected = withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
      }
    }
    guard connected else { throw HarnessError("swtpm not reachable") }
    _ = command.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    guard let header = readExactly(fd, 10) else { throw HarnessError("no response header") }
    let size = Int(header[2]) << 24 | Int(header[3]) << 16 | Int(header[4]) << 8 | Int(header[5])
    guard size >= 10, let body = readExactly(fd, size - 10) else { throw HarnessError("short response") }
    return header + body
  }

  private func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
    if count == 0 { return [] }
    var out = [UInt8](repeating: 0, count: count)
    var got = 0
    while got < count {
      let n = out.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, count - got) }
      if n > 0 {
        got += n
      } else if n < 0 && errno == EINTR {
        continue
      } else {
        return nil
      }
    }
    return out
  }
}
