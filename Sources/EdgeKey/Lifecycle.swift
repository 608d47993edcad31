import Dispatch
import EdgeKeyCore

#if canImport(Glibc)
  import Glibc
#endif

/// systemd's service notifications (`Type=notify`): `READY=1`, `STOPPING=1`, `WATCHDOG=1`,
/// `STATUS=...`. Nothing happens outside systemd (no `NOTIFY_SOCKET`).
public enum Systemd {
  /// systemd's readiness protocol without libsystemd: one datagram to $NOTIFY_SOCKET.
  public static func notify(_ message: String) {
    guard let socketPath = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !socketPath.isEmpty else { return }
    let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    // An abstract socket is written with a leading NUL in place of '@'.
    var bytes = Array(socketPath.utf8)
    if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, b) in bytes.enumerated() { raw[i] = b }
    }
    let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
    _ = message.withCString { text in
      withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, text, strlen(text), 0, $0, length) }
      }
    }
  }

  /// The watchdog interval systemd asks for (`WatchdogSec=`, from `WATCHDOG_USEC`), or nil.
  public static var watchdogInterval: Duration? {
    guard let text = getenv("WATCHDOG_USEC").map({ String(cString: $0) }), let usec = Int64(text), usec > 0 else {
      return nil
    }
    return .microseconds(usec)
  }
}

/// Signals as an AsyncStream (a dispatch source per signal; the signal's default action is
/// turned off while the stream lives and restored by `cancel()`).
final class SignalStream: @unchecked Sendable {
  // @unchecked: `sources` is set in init and only cancelled after.
  let stream: AsyncStream<Int32>
  private let sink: AsyncStream<Int32>.Continuation
  private var sources: [DispatchSourceSignal] = []
  private let signals: [Int32]
  private static let queue = DispatchQueue(label: "edgekey.signals")

  init(_ signals: [Int32]) {
    self.signals = signals
    (stream, sink) = AsyncStream.makeStream(of: Int32.self)
    for s in signals {
      signal(s, SIG_IGN)
      let source = DispatchSource.makeSignalSource(signal: s, queue: Self.queue)
      let sink = self.sink
      source.setEventHandler { sink.yield(s) }
      source.resume()
      sources.append(source)
    }
  }

  func cancel() {
    sources.forEach { $0.cancel() }
    for s in signals { signal(s, SIG_DFL) }
    sink.finish()
  }
}

/// Blocking work (TPM commands, EST, an outbox fsync, joining a thread) on threads of
/// EdgeKey's own (`BlockingPool`), never on Swift's cooperative pool, which has as many threads
/// as cores.
enum Offload {
  static func run<T: Sendable>(_ what: String, _ body: @escaping @Sendable () throws -> T) async throws(EdgeKeyError)
    -> T
  {
    do {
      return try await BlockingPool.shared.run { () throws(any Error) -> T in try body() }
    } catch {
      throw EdgeKeyError(error, context: what)
    }
  }

  static func quietly(_ body: @escaping @Sendable () -> Void) async {
    await BlockingPool.shared.run(body)
  }
}
