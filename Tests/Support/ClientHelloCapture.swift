import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A TCP listener that reads the first TLS ClientHello a client sends and closes: what the
/// client put in its server_name (SNI) and ALPN extensions, seen from the wire, whoever built
/// the handshake (libssl for us, libmosquitto, libcurl).
public final class ClientHelloCapture: @unchecked Sendable {
  // @unchecked: `hellos` is guarded by `lock`; the listener is closed once in deinit.
  public let port: UInt16
  private let listener: Int32
  private let lock = NSCondition()
  private var hellos: [(serverName: String?, alpn: [String])] = []

  public init() throws {
    (listener, port) = try PortFinder.listeningSocket()
    Thread.detachNewThread { [self] in serve() }
  }

  deinit { shutdown(listener, Int32(SHUT_RDWR)) }

  /// Waits for the `n`-th ClientHello (1-based) and returns it.
  public func hello(_ n: Int = 1, timeout: TimeInterval = 20) throws -> (serverName: String?, alpn: [String]) {
    let deadline = Date().addingTimeInterval(timeout)
    lock.lock()
    defer { lock.unlock() }
    while hellos.count < n {
      if !lock.wait(until: deadline) { throw HarnessError("no ClientHello #\(n) within \(timeout) s") }
    }
    return hellos[n - 1]
  }

  private func serve() {
    while true {
      let client = accept(listener, nil, nil)
      if client < 0 { return }
      var data: [UInt8] = []
      var buffer = [UInt8](repeating: 0, count: 4096)
      while data.count < 5 || data.count < 5 + (Int(data[3]) << 8 | Int(data[4])) {
        let n = read(client, &buffer, buffer.count)
        if n <= 0 { break }
        data += buffer[0..<n]
      }
      close(client)
      if let parsed = ClientHelloCapture.parse(data) {
        lock.lock()
        hellos.append(parsed)
        lock.broadcast()
        lock.unlock()
      }
    }
  }

  /// The server_name and ALPN extensions of a ClientHello record.
  static func parse(_ d: [UInt8]) -> (serverName: String?, alpn: [String])? {
    func u16(_ i: Int) -> Int { Int(d[i]) << 8 | Int(d[i + 1]) }
    guard d.count > 43, d[0] == 22, d[5] == 1 else { return nil }
    var i = 9 + 2 + 32  // record + handshake headers, version, random
    i += 1 + Int(d[i])  // session id
    guard i + 2 <= d.count else { return nil }
    i += 2 + u16(i)  // cipher suites
    guard i + 1 <= d.count else { return nil }
    i += 1 + Int(d[i])  // compression methods
    guard i + 2 <= d.count else { return nil }
    let end = min(d.count, i + 2 + u16(i))
    i += 2
    var serverName: String?
    var alpn: [String] = []
    while i + 4 <= end {
      let type = u16(i)
      let length = u16(i + 2)
      let body = i + 4
      guard body + length <= end else { return nil }
      if type == 0, length >= 5 {
        serverName = String(decoding: d[(body + 5)..<(body + 5 + u16(body + 3))], as: UTF8.self)
      } else if type == 16, length >= 2 {
        var j = body + 2
        while j < body + length {
          let n = Int(d[j])
          alpn.append(String(decoding: d[(j + 1)..<(j + 1 + n)], as: UTF8.self))
          j += 1 + n
        }
      }
      i = body + length
    }
    return (serverName, alpn)
  }
}
