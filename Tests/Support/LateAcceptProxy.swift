import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A TCP proxy whose listen queue is full until ``release()``: a client's SYN is dropped, so its
/// non-blocking connect stays pending until the kernel retransmits the SYN (about a second
/// later), as on a loaded broker or a lossy link. Then connections are relayed to `target`.
///
/// This is what a busy machine does to a loopback connect now and then; here it happens every
/// time, so that a client that does not drive its TLS handshake once the connect completes is
/// caught (libmosquitto's external-loop API leaves that to the caller).
public final class LateAcceptProxy: @unchecked Sendable {
  public let port: UInt16
  private let target: UInt16
  private let listener: Int32
  private let filler: Int32
  private let released = DispatchSemaphore(value: 0)
  private let overflowsAtStart: Int

  public init(to target: UInt16) throws {
    harnessIgnoresSIGPIPE
    self.target = target
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = LateAcceptProxy.loopback(0)
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    // Backlog 0: one connection waiting to be accepted fills the queue.
    guard bound == 0, listen(fd, 0) == 0 else { throw HarnessError("late-accept proxy: bind/listen failed") }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    port = UInt16(bigEndian: address.sin_port)
    listener = fd
    filler = try LateAcceptProxy.connect(port)
    overflowsAtStart = LateAcceptProxy.listenOverflows()
    Thread.detachNewThread { [self] in serve() }
  }

  deinit {
    shutdown(listener, Int32(SHUT_RDWR))
    close(filler)
  }

  /// Empties the listen queue once a client's SYN to the proxy was dropped (the kernel's
  /// ListenOverflows counter went up): its retransmitted SYN, about a second later, is then
  /// answered and the connection relayed.
  public func releaseWhenConnectPending() { released.signal() }

  /// TcpExt ListenOverflows from /proc/net/netstat: SYNs dropped because a listen queue was full.
  static func listenOverflows() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/net/netstat", encoding: .utf8) else { return 0 }
    let lines = text.split(separator: "\n").filter { $0.hasPrefix("TcpExt:") }
    guard lines.count >= 2 else { return 0 }
    let names = lines[0].split(separator: " ")
    let values = lines[1].split(separator: " ")
    guard let i = names.firstIndex(of: "ListenOverflows"), i < values.count else { return 0 }
    return Int(values[i]) ?? 0
  }

  private func serve() {
    released.wait()
    while LateAcceptProxy.listenOverflows() <= overflowsAtStart { usleep(2_000) }
    let first = accept(listener, nil, nil)  // the filler
    if first >= 0 { close(first) }
    while true {
      let client = accept(listener, nil, nil)
      if client < 0 { return }
      guard let server = try? LateAcceptProxy.connect(target) else {
        close(client)
        continue
      }
      Thread.detachNewThread { LateAcceptProxy.relay(client, server) }
    }
  }

  private static func relay(_ a: Int32, _ b: Int32) {
    defer {
      close(a)
      close(b)
    }
    var buffer = [UInt8](repeating: 0, count: 16384)
    while true {
      var fds = [pollfd(fd: a, events: Int16(POLLIN), revents: 0), pollfd(fd: b, events: Int16(POLLIN), revents: 0)]
      if poll(&fds, 2, -1) < 0 { return }
      for (from, to) in [(0, b), (1, a)] where fds[from].revents != 0 {
        let n = read(fds[from].fd, &buffer, buffer.count)
        if n <= 0 { return }
        var sent = 0
        while sent < n {
          let w = buffer[sent..<n].withUnsafeBytes { send(to, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
          if w <= 0 { return }
          sent += w
        }
      }
    }
  }

  private static func loopback(_ port: UInt16) -> sockaddr_in {
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    a.sin_port = port.bigEndian
    return a
  }

  private static func connect(_ port: UInt16) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var a = loopback(port)
    let rc = withUnsafePointer(to: &a) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
      }
    }
    guard rc == 0 else {
      close(fd)
      throw HarnessError("connect to \(port): \(String(cString: strerror(errno)))")
    }
    return fd
  }
}
