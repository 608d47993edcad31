internal import CEdgeKeyProvider
internal import COpenSSL
import EdgeKeyTLS
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// An HTTP/1.1 request as the server read it.
public struct HTTPRequest: Sendable {
  /// "GET", "POST", ...
  public var method: String
  /// The path, without the query.
  public var path: String
  /// Header names lower-cased, in arrival order.
  public var headers: [(name: String, value: String)]
  /// The body (Content-Length framed).
  public var body: [UInt8]
  /// The client certificate chain the TLS layer verified (leaf first), or empty.
  public var clientCertificates: [Certificate]
  /// The tls-unique channel binding of this connection (RFC 5929).
  public var tlsUnique: [UInt8]
  /// The TLS version of the connection (`0x0303` TLS 1.2, `0x0304` TLS 1.3).
  public var tlsVersion: Int32
  /// The client's IP address, as text.
  public var peerAddress: String = ""
  /// Whether the TLS session was resumed (an abbreviated handshake).
  public var resumedSession = false

  /// The first header named `name` (any case), or nil.
  public func header(_ name: String) -> String? {
    let lower = name.lowercased()
    return headers.first { $0.name == lower }?.value
  }
}

/// An HTTP response. `raw` bypasses the framing (a test's hostile server sends whatever it likes).
public struct HTTPResponse: Sendable {
  /// The HTTP status.
  public var status: Int
  /// Headers besides Content-Length and Connection, which the server adds.
  public var headers: [(String, String)]
  /// The body.
  public var body: [UInt8]
  /// Bytes sent as they are instead of a framed response (then the connection is closed).
  public var raw: [UInt8]?

  /// A response of `status`.
  public init(status: Int, headers: [(String, String)] = [], body: [UInt8] = []) {
    self.status = status
    self.headers = headers
    self.body = body
  }

  /// Bytes sent as they are, then the connection is closed.
  public static func raw(_ bytes: [UInt8]) -> HTTPResponse {
    var r = HTTPResponse(status: 0)
    r.raw = bytes
    return r
  }

  /// A plain-text message, as EST servers explain an error.
  public static func text(_ status: Int, _ message: String, headers: [(String, String)] = []) -> HTTPResponse {
    HTTPResponse(
      status: status, headers: [("Content-Type", "text/plain; charset=utf-8")] + headers,
      body: Array((message + "\n").utf8))
  }

  static func reasonPhrase(_ status: Int) -> String {
    switch status {
    case 200: return "OK"
    case 202: return "Accepted"
    case 204: return "No Content"
    case 400: return "Bad Request"
    case 401: return "Unauthorized"
    case 403: return "Forbidden"
    case 404: return "Not Found"
    case 405: return "Method Not Allowed"
    case 408: return "Request Timeout"
    case 411: return "Length Required"
    case 413: return "Payload Too Large"
    case 415: return "Unsupported Media Type"
    case 429: return "Too Many Requests"
    case 431: return "Request Header Fields Too Large"
    case 500: return "Internal Server Error"
    case 503: return "Service Unavailable"
    default: return "Status"
    }
  }

  func encoded(keepAlive: Bool) -> [UInt8] {
    if let raw { return raw }
    var head = "HTTP/1.1 \(status) \(HTTPResponse.reasonPhrase(status))\r\n"
    for (name, value) in headers { head += "\(name): \(value)\r\n" }
    head += "Content-Length: \(body.count)\r\nConnection: \(keepAlive ? "keep-alive" : "close")\r\n\r\n"
    return Array(head.utf8) + body
  }
}

/// Limits that keep a hostile client from holding the server.
public struct HTTPServerLimits: Sendable {
  /// The longest request head accepted.
  public var maximumHeaderBytes = 16 * 1024
  /// The largest body accepted.
  public var maximumBodyBytes = 64 * 1024
  /// The whole of a request: the TLS handshake (for the first), the wait for it, its head
  /// and its body. A client that sends a byte now and then is dropped when it passes.
  public var requestTimeout: Duration = .seconds(10)
  /// Connections served at once; more wait in the listen queue.
  public var maximumConnections = 64
  /// Connections from one address at once; more are closed on arrival.
  public var maximumConnectionsPerSource = 16
  /// Requests served on one connection before it is closed.
  public var maximumRequestsPerConnection = 8
  /// The defaults above.
  public init() {}
}

/// A small HTTPS/1.1 server over OpenSSL: one thread per connection, a few requests per
/// connection (keep-alive, so that an EST client can bind a request to the connection it opened
/// with another: RFC 7030 channel binding). Enough for a registration authority on a factory
/// line and for tests; not a web server.
public final class HTTPSServer: @unchecked Sendable {
  // @unchecked: `listener`, `wake` and `acceptThread` are set in `start` before sharing;
  // `active` and `perSource` are guarded by `lock`.
  /// Answers a request; called on the connection's thread.
  public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse

  /// The port it listens on (the one the system chose when asked for 0).
  public private(set) var port: UInt16 = 0
  private let context: OpaquePointer
  private let handler: Handler
  private let limits: HTTPServerLimits
  private var listener: Int32 = -1
  private var wake: [Int32] = [-1, -1]
  private let lock = NSLock()
  private var active = 0
  private var perSource: [String: Int] = [:]
  private var stopped = false
  private let done = DispatchSemaphore(value: 0)

  /// - Parameters:
  ///   - context: a server `SSL_CTX` (see `edgekey_tls_server_ctx`); this object takes it.
  package init(context: OpaquePointer, limits: HTTPServerLimits = HTTPServerLimits(), handler: @escaping Handler) {
    self.context = context
    self.limits = limits
    self.handler = handler
  }

  deinit {
    stop()
    SSL_CTX_free(context)
  }

  /// Binds `host:port` (port 0: the kernel picks a free one) and starts accepting.
  public func start(host: String = "127.0.0.1", port requested: UInt16 = 0) throws {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw HTTPServerError("socket: \(String(cString: strerror(errno)))") }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = requested.bigEndian
    guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
      close(fd)
      throw HTTPServerError("\(host) is not an IPv4 address")
    }
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    // A long listen queue: while every slot is taken (a slow-client flood), new connections wait
    // in it in arrival order instead of having their SYNs dropped and retried with back-off,
    // which left a normal client waiting minutes behind attackers that reconnect at once.
    guard bound == 0, listen(fd, 1024) == 0 else {
      let e = errno
      close(fd)
      throw HTTPServerError("cannot listen on \(host):\(requested): \(String(cString: strerror(e)))")
    }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    port = UInt16(bigEndian: address.sin_port)
    listener = fd
    guard pipe(&wake) == 0 else { throw HTTPServerError("pipe: \(String(cString: strerror(errno)))") }
    for fd in wake { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    let thread = Thread { [self] in acceptLoop() }
    thread.name = "edgekey-https-accept"
    thread.start()
  }

  /// Stops accepting and waits for the accept loop; connections in progress finish on their own.
  public func stop() {
    lock.lock()
    let wasRunning = listener >= 0 && !stopped
    stopped = true
    lock.unlock()
    guard wasRunning else { return }
    var byte: UInt8 = 1
    _ = write(wake[1], &byte, 1)
    done.wait()
    close(listener)
    close(wake[0])
    close(wake[1])
  }

  private func acceptLoop() {
    defer { done.signal() }
    while true {
      // At the connection limit the listener is not polled: new clients wait in the kernel's
      // queue (their connect has succeeded) until a slot frees, instead of being reset.
      lock.lock()
      let full = active >= limits.maximumConnections
      lock.unlock()
      var fds = [pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0)]
      if !full { fds.append(pollfd(fd: listener, events: Int16(POLLIN), revents: 0)) }
      let n = poll(&fds, nfds_t(fds.count), full ? 50 : -1)
      if n < 0 && errno == EINTR { continue }
      if fds[0].revents != 0 { return }
      guard !full, fds[1].revents & Int16(POLLIN) != 0 else { continue }
      var address = sockaddr_storage()
      var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
      let client = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(listener, $0, &length) }
      }
      guard client >= 0 else { continue }
      _ = fcntl(client, F_SETFD, FD_CLOEXEC)
      let source = HTTPSServer.addressText(&address)
      lock.lock()
      let admitted = perSource[source, default: 0] < limits.maximumConnectionsPerSource
      if admitted {
        active += 1
        perSource[source, default: 0] += 1
      }
      lock.unlock()
      guard admitted else {
        close(client)
        continue
      }
      let thread = Thread { [self] in
        serve(client, source: source)
        close(client)
        lock.lock()
        active -= 1
        perSource[source, default: 1] -= 1
        if perSource[source] == 0 { perSource[source] = nil }
        lock.unlock()
      }
      thread.name = "edgekey-https-connection"
      thread.start()
    }
  }

  private static func addressText(_ address: inout sockaddr_storage) -> String {
    var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
    switch Int32(address.ss_family) {
    case AF_INET:
      withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
          var a = $0.pointee.sin_addr
          _ = inet_ntop(AF_INET, &a, &text, socklen_t(text.count))
        }
      }
    case AF_INET6:
      withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
          var a = $0.pointee.sin6_addr
          _ = inet_ntop(AF_INET6, &a, &text, socklen_t(text.count))
        }
      }
    default: return "unknown"
    }
    return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  private func serve(_ fd: Int32, source: String) {
    // Non-blocking: every TLS read and write waits in poll for what is left of the request's
    // deadline, so that no pace of trickled bytes can hold the connection longer.
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    // Answers go out at once: on a kept-alive connection Nagle's algorithm would hold a response
    // behind the session tickets until the client's delayed ACK (40 ms, twice per enrollment).
    var one: Int32 = 1
    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    guard let ssl = SSL_new(context) else { return }
    defer { SSL_free(ssl) }
    // A client that vanishes while we write its answer costs an EPIPE on that connection, not
    // the process: every write is send(MSG_NOSIGNAL) (a device killed mid-enrollment once
    // killed the registration authority), and the process's SIGPIPE disposition is left alone.
    guard edgekey_ssl_set_socket(ssl, fd) == 1 else { return }
    var connection = TLSServerConnection(ssl: ssl, fd: fd, deadline: ContinuousClock.now + limits.requestTimeout)
    guard connection.perform({ SSL_accept($0) }) == 1 else {
      if connection.timedOut {
        FileHandle.standardError.write(Data("TLS handshake from \(source) not finished in time: dropped\n".utf8))
        ERR_clear_error()
        return
      }
      // The operator's first question about a failed handshake: which side, and why.
      let e = ERR_get_error()
      var text = [CChar](repeating: 0, count: 256)
      ERR_error_string_n(e, &text, text.count)
      let verify = SSL_get_verify_result(ssl)
      var line =
        "TLS handshake from \(source) failed: \(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))"
      if verify != Int(X509_V_OK) {
        line += "; client certificate: \(String(cString: X509_verify_cert_error_string(verify)))"
      }
      ERR_clear_error()
      FileHandle.standardError.write(Data((line + "\n").utf8))
      return
    }
    // Requests in a row on this connection, until the client asks to close, an error, a raw
    // answer, or the per-connection limit.
    var buffer: [UInt8] = []
    for served in 0..<limits.maximumRequestsPerConnection {
      if served > 0 { connection.deadline = ContinuousClock.now + limits.requestTimeout }
      let response: HTTPResponse
      var keepAlive = served + 1 < limits.maximumRequestsPerConnection
      switch readRequest(&connection, &buffer, first: served == 0) {
      case .request(var request):
        request.peerAddress = source
        response = handler(request)
        if request.header("connection")?.lowercased() == "close" { keepAlive = false }
      case .refused(let refusal):
        response = refusal
        keepAlive = false
      case .closed:
        connection.shutdown()
        return
      }
      if response.raw != nil || response.status >= 400 { keepAlive = false }
      // The answer gets a deadline of its own: a client that does not read it is dropped.
      connection.deadline = ContinuousClock.now + limits.requestTimeout
      let bytes = response.encoded(keepAlive: keepAlive)
      var sent = 0
      while sent < bytes.count {
        let n = bytes[sent...].withUnsafeBytes { chunk in
          connection.perform { SSL_write($0, chunk.baseAddress, Int32(chunk.count)) }
        }
        if n <= 0 { break }
        sent += Int(n)
      }
      if !keepAlive || sent < bytes.count { break }
    }
    connection.shutdown()
  }

  /// Reads one request; bytes after it stay in `buffer` for the next. A connection the client
  /// closes (or lets idle past the socket timeout) between requests is `.closed`.
  private func readRequest(_ connection: inout TLSServerConnection, _ buffer: inout [UInt8], first: Bool)
    -> ReadOutcome
  {
    var chunk = [UInt8](repeating: 0, count: 16 * 1024)
    func readMore() -> Bool {
      let n = connection.perform { SSL_read($0, &chunk, Int32(chunk.count)) }
      if n <= 0 { return false }
      buffer += chunk[0..<Int(n)]
      return true
    }
    let ssl = connection.ssl
    let separator: [UInt8] = [13, 10, 13, 10]
    var headerEnd: Int?
    while headerEnd == nil {
      if let range = firstRange(of: separator, in: buffer) {
        headerEnd = range
        break
      }
      if buffer.count > limits.maximumHeaderBytes { return .refused(.text(431, "request headers too large")) }
      if !readMore() {
        return buffer.isEmpty && (!first || connection.timedOut) ? .closed : .refused(.text(408, "incomplete request"))
      }
    }
    let head: HTTPRequestHead
    do { head = try HTTPRequestHead(parsing: buffer[0..<headerEnd!]) } catch { return .refused(error.response) }
    var body = Array(buffer[(headerEnd! + 4)...])
    buffer.removeAll()
    let length = head.contentLength
    if length > limits.maximumBodyBytes {
      // Read (and drop) a moderately oversized body, so that the client is not reset while
      // sending and sees the 413; a huge one is cut off.
      var discarded = body.count
      while discarded < length && discarded < 1 << 20 {
        let n = connection.perform { SSL_read($0, &chunk, Int32(chunk.count)) }
        if n <= 0 { break }
        discarded += Int(n)
      }
      return .refused(.text(413, "the body is larger than \(limits.maximumBodyBytes) bytes"))
    }
    while body.count < length {
      if !readMore() { return .refused(.text(408, "incomplete body")) }
      body += buffer
      buffer.removeAll()
    }
    if body.count > length {
      buffer = Array(body[length...])  // the start of the next request
      body = Array(body[0..<length])
    }
    var peers: [Certificate] = []
    if let chain = edgekey_tls_server_client_chain(ssl) {
      peers = Certificate.copies(of: chain)
      OPENSSL_sk_pop_free(chain, freeX509)
    }
    var unique = [UInt8](repeating: 0, count: 64)
    let uniqueLength = edgekey_tls_unique(ssl, &unique, unique.count)
    var request = HTTPRequest(
      method: head.method, path: head.path, headers: head.headers, body: body, clientCertificates: peers,
      tlsUnique: uniqueLength > 0 ? Array(unique[0..<Int(uniqueLength)]) : [], tlsVersion: SSL_version(ssl))
    request.resumedSession = SSL_session_reused(ssl) == 1
    return .request(request)
  }
}

/// The request line and headers of an HTTP/1.1 request: the bytes before the blank line, as a
/// client sent them. Anything the server will not serve is a refusal with its status.
package struct HTTPRequestHead: Sendable {
  package var method: String
  /// The path, without the query.
  package var path: String
  /// Header names lower-cased, in arrival order.
  package var headers: [(name: String, value: String)]
  /// Content-Length, 0 when absent.
  package var contentLength: Int

  package struct Refusal: Error {
    package var response: HTTPResponse
    init(_ status: Int, _ message: String) { response = .text(status, message) }
  }

  package init(parsing bytes: ArraySlice<UInt8>) throws(Refusal) {
    let text = String(decoding: bytes, as: UTF8.self)
    var lines = text.components(separatedBy: "\r\n")
    let requestLine = lines.removeFirst().split(separator: " ", omittingEmptySubsequences: false)
    guard requestLine.count == 3, !requestLine[0].isEmpty, requestLine[1].hasPrefix("/"),
      requestLine[2].hasPrefix("HTTP/1.")
    else { throw Refusal(400, "malformed request line") }
    headers = []
    for line in lines where !line.isEmpty {
      guard let colon = line.firstIndex(of: ":"), colon != line.startIndex else {
        throw Refusal(400, "malformed header line")
      }
      headers.append(
        (line[..<colon].lowercased(), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)))
    }
    if headers.contains(where: { $0.name == "transfer-encoding" }) {
      throw Refusal(411, "chunked bodies are not accepted: send Content-Length")
    }
    let lengths = headers.filter { $0.name == "content-length" }.map(\.value)
    guard lengths.count <= 1 else { throw Refusal(400, "more than one Content-Length") }
    if let text = lengths.first {
      guard !text.isEmpty, text.utf8.count <= 12, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
        let length = Int(text)
      else { throw Refusal(400, "malformed Content-Length") }
      contentLength = length
    } else {
      contentLength = 0
    }
    method = String(requestLine[0])
    let target = requestLine[1]
    path = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? "/"
  }
}

/// One TLS connection on a non-blocking socket, every operation bounded by `deadline`.
struct TLSServerConnection {
  let ssl: OpaquePointer
  let fd: Int32
  var deadline: ContinuousClock.Instant
  private(set) var timedOut = false

  init(ssl: OpaquePointer, fd: Int32, deadline: ContinuousClock.Instant) {
    self.ssl = ssl
    self.fd = fd
    self.deadline = deadline
  }

  /// Runs an SSL_* call until it is done or fails, waiting in poll while it wants to read or
  /// write; past the deadline it fails with `timedOut`.
  mutating func perform(_ operation: (OpaquePointer) -> Int32) -> Int32 {
    while true {
      let n = operation(ssl)
      if n > 0 { return n }
      let events: Int16
      switch SSL_get_error(ssl, n) {
      case SSL_ERROR_WANT_READ: events = Int16(POLLIN)
      case SSL_ERROR_WANT_WRITE: events = Int16(POLLOUT)
      default: return n
      }
      let left = deadline - ContinuousClock.now
      guard left > .zero else {
        timedOut = true
        return -1
      }
      var p = pollfd(fd: fd, events: events, revents: 0)
      let milliseconds = Int32(min(left.milliseconds + 1, 60_000))
      if poll(&p, 1, milliseconds) < 0 && errno != EINTR { return -1 }
    }
  }

  /// A close_notify if the peer still listens (not waited for), and the error queue cleared.
  mutating func shutdown() {
    if !timedOut { SSL_shutdown(ssl) }
    ERR_clear_error()
  }
}

private let freeX509: @convention(c) (UnsafeMutableRawPointer?) -> Void = { X509_free(OpaquePointer($0)) }

enum ReadOutcome {
  case request(HTTPRequest)
  case refused(HTTPResponse)
  case closed
}

func firstRange(of needle: [UInt8], in haystack: [UInt8]) -> Int? {
  guard haystack.count >= needle.count else { return nil }
  for i in 0...(haystack.count - needle.count) where haystack[i] == needle[0] {
    if Array(haystack[i..<(i + needle.count)]) == needle { return i }
  }
  return nil
}

/// The server could not start (the address, the certificate, the key).
public struct HTTPServerError: Error, CustomStringConvertible, Sendable {
  public var description: String
  /// An error described by `description`.
  public init(_ description: String) { self.description = description }
}
