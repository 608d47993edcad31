import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A TCP proxy on loopback between a client and a server that breaks the network on demand:
/// the client connects to `port`, the proxy to the server.
///
/// - `partition()`: every byte, in both directions, is read and thrown away, on the connections
///   that exist and on new ones (accepted, never forwarded): a cable pulled, a route gone. Neither
///   side sees a close; only timeouts (MQTT keepalive, connect timeout) tell.
/// - `heal()`: new connections are forwarded again. Connections that lived through the
///   partition stay dead, as after a NAT mapping expired: their lost bytes cannot be replayed.
/// - `resetAll()`: every connection is closed at once (a broker or a middlebox that vanishes).
public final class FaultProxy: @unchecked Sendable {
  public let port: UInt16
  private let target: UInt16
  private let listener: Int32
  private let lock = NSLock()
  private var partitioned = false
  private var resetRequested = false
  /// The next accepted connection is reset (RST) instead of forwarding its n-th client read.
  private var resetNextAtFlight: Int?
  private var stopping = false
  private var wake: [Int32] = [-1, -1]
  private let finished = DispatchSemaphore(value: 0)
  /// Bytes thrown away while partitioned.
  public private(set) var droppedBytes = 0

  private struct Pair {
    var client: Int32
    var server: Int32  // -1 for a connection accepted during a partition
    var dead: Bool
    var clientReads = 0
    var resetAtFlight: Int? = nil
  }

  public init(to targetPort: UInt16) throws {
    harnessIgnoresSIGPIPE
    target = targetPort
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw HarnessError("proxy socket: \(String(cString: strerror(errno)))") }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var address = FaultProxy.loopback(0)
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0, listen(fd, 64) == 0 else {
      close(fd)
      throw HarnessError("proxy bind/listen: \(String(cString: strerror(errno)))")
    }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    port = UInt16(bigEndian: address.sin_port)
    listener = fd
    guard pipe(&wake) == 0 else { throw HarnessError("proxy pipe") }
    let thread = Thread { [self] in
      run()
      finished.signal()
    }
    thread.name = "fault-proxy"
    thread.start()
  }

  deinit { stop() }

  public func partition() { set { $0.partitioned = true } }
  public func heal() { set { $0.partitioned = false } }
  public func resetAll() { set { $0.resetRequested = true } }
  /// Resets the next connection with a TCP RST in place of forwarding its `flight`-th read
  /// from the client: `2` drops a TLS 1.3 client's Certificate flight on the floor (the server
  /// never sees it) and resets, a middlebox failing at the worst moment.
  public func resetNextConnection(atClientFlight flight: Int) { set { $0.resetNextAtFlight = flight } }

  public func stop() {
    let first: Bool = lock.withLock {
      defer { stopping = true }
      return !stopping
    }
    guard first else { return }
    _ = write(wake[1], "x", 1)
    finished.wait()
    close(listener)
    close(wake[0])
    close(wake[1])
  }

  private func set(_ change: (FaultProxy) -> Void) {
    lock.withLock { change(self) }
    _ = write(wake[1], "x", 1)
  }

  private static func loopback(_ port: UInt16) -> sockaddr_in {
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_port = port.bigEndian
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    return a
  }

  private func connectUpstream() -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return -1 }
    var address = FaultProxy.loopback(target)
    let rc = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
      }
    }
    if rc != 0 {
      close(fd)
      return -1
    }
    return fd
  }

  private func run() {
    var pairs: [Pair] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    func closePair(_ i: Int) {
      close(pairs[i].client)
      if pairs[i].server >= 0 { close(pairs[i].server) }
      pairs[i].client = -1
    }
    while true {
      let (partitioned, reset, stopping) = lock.withLock { () -> (Bool, Bool, Bool) in
        defer { resetRequested = false }
        return (self.partitioned, resetRequested, self.stopping)
      }
      if stopping || reset {
        for i in pairs.indices { closePair(i) }
        pairs.removeAll()
        if stopping { return }
      }
      if partitioned {
        for i in pairs.indices { pairs[i].dead = true }
      }
      var fds = [
        pollfd(fd: listener, events: Int16(POLLIN), revents: 0), pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0),
      ]
      for p in pairs {
        fds.append(pollfd(fd: p.client, events: Int16(POLLIN), revents: 0))
        fds.append(pollfd(fd: p.server, events: Int16(POLLIN), revents: 0))  // -1 is ignored by poll
      }
      guard poll(&fds, nfds_t(fds.count), 1000) >= 0 else { continue }
      let polled = pairs.count  // a connection accepted below waits for the next poll
      if fds[1].revents != 0 {
        var drain = [UInt8](repeating: 0, count: 64)
        _ = read(wake[0], &drain, drain.count)
      }
      if fds[0].revents & Int16(POLLIN) != 0 {
        let client = accept(listener, nil, nil)
        if client >= 0 {
          _ = fcntl(client, F_SETFD, FD_CLOEXEC)
          if partitioned {
            pairs.append(Pair(client: client, server: -1, dead: true))
          } else {
            let server = connectUpstream()
            let flight = lock.withLock { () -> Int? in
              defer { resetNextAtFlight = nil }
              return resetNextAtFlight
            }
            if server < 0 {
              close(client)
            } else {
              pairs.append(Pair(client: client, server: server, dead: false, resetAtFlight: flight))
            }
          }
        }
      }
      for i in 0..<polled where pairs[i].client >= 0 {
        let pair = pairs[i]
        for (from, to, slot) in [(pair.client, pair.server, 2 + 2 * i), (pair.server, pair.client, 3 + 2 * i)]
        where from >= 0 && fds[slot].revents != 0 {
          let n = read(from, &buffer, buffer.count)
          if n <= 0 {
            // A side closed. Through a partition nobody hears of it; otherwise pass it on.
            if pair.dead {
              if from == pair.server { close(pair.server); pairs[i].server = -1 } else { closePair(i) }
            } else {
              closePair(i)
            }
            break
          }
          if pair.dead {
            lock.withLock { droppedBytes += n }
            continue
          }
          if from == pair.client {
            pairs[i].clientReads += 1
            if let flight = pair.resetAtFlight, pairs[i].clientReads >= flight {
              // SO_LINGER 0: close() sends RST, not FIN.
              var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
              setsockopt(pair.client, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
              closePair(i)
              break
            }
          }
          var sent = 0
          while sent < n {
            let m = buffer.withUnsafeBytes { write(to, $0.baseAddress! + sent, n - sent) }
            if m <= 0 { break }
            sent += m
          }
        }
      }
      pairs.removeAll { $0.client < 0 }
    }
  }
}
