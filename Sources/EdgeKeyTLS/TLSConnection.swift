internal import CEdgeKeyProvider
internal import COpenSSL
import EdgeKeyCore
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// One blocking mutual-TLS connection over TCP: for `doctor`, enrollment probes and tests.
/// (MQTT and HTTPS hand the `TLSClientContext` to libmosquitto and libcurl instead.)
///
/// Every failure is a `TLSError` naming the layer. With TLS 1.3 the server judges our
/// certificate after our side of the handshake has finished, so its refusal arrives on the
/// first read; `read` and `write` diagnose it the same way.
public final class TLSConnection {
  private let ssl: OpaquePointer
  private let fd: Int32
  /// The context it was made with.
  public let context: TLSClientContext

  /// Connects to `host:port` within `timeout`, then completes the handshake; each read and
  /// write after that times out after `timeout` too.
  public init(context: TLSClientContext, host: String, port: UInt16, timeout: Duration = .seconds(10))
    throws(TLSError)
  {
    self.context = context
    fd = try TLSConnection.connectTCP(host: host, port: port, timeout: timeout)
    guard let ssl = SSL_new(context.sslContext) else {
      close(fd)
      throw TLSError(.tls, .other, "SSL_new failed")
    }
    self.ssl = ssl
    // Writes with MSG_NOSIGNAL: a server that closes mid-write is an error here, never a
    // SIGPIPE for the process (whose disposition EdgeKey leaves alone).
    guard edgekey_ssl_set_socket(ssl, fd) == 1 else {
      SSL_free(ssl)
      close(fd)
      throw TLSError(.tls, .other, "no socket BIO")
    }
    _ = edgekey_tls_set_endpoint(ssl, "\(host):\(port)")
    // SNI is the context's: the name it verifies, never an IP literal (edgekey_tls.h).
    ERR_clear_error()
    let rc = SSL_connect(ssl)
    if rc != 1 {
      // Every stored property is set, so deinit runs after this throw and frees ssl and fd.
      throw diagnose(rc)
    }
    connected = true
  }

  private var connected = false

  deinit {
    if connected { SSL_shutdown(ssl) }
    SSL_free(ssl)
    close(fd)
  }

  /// The handshake resumed a session kept from an earlier connection to this endpoint
  /// (`TLSPolicy.resumesSessions`): no certificate was sent and the TPM signed nothing.
  public var resumedSession: Bool { SSL_session_reused(ssl) == 1 }

  /// "TLSv1.3", "TLSv1.2".
  public var protocolVersion: String { String(cString: SSL_get_version(ssl)) }
  /// The negotiated cipher suite, e.g. "TLS_AES_256_GCM_SHA384".
  public var cipherSuite: String { String(cString: SSL_CIPHER_get_name(SSL_get_current_cipher(ssl))) }
  /// The server showed it accepted our certificate: TLS 1.2 (its Finished came after its check
  /// of it), or a TLS 1.3 session ticket.
  public var acceptedOurCertificate: Bool { TLSConnectionSummary.of(ssl: ssl)?.serverAcceptedUs ?? false }

  /// The application protocol the server chose from ``TLSPolicy/alpn`` (RFC 7301), if any.
  public var alpnProtocol: String? {
    var name = [CChar](repeating: 0, count: 256)
    guard edgekey_tls_alpn_selected(ssl, &name, name.count) == 1 else { return nil }
    return String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }
  /// The server's certificate.
  public var peerCertificate: Certificate? { SSL_get1_peer_certificate(ssl).map { Certificate(owning: $0) } }

  /// Sends all of `bytes`.
  public func write(_ bytes: [UInt8]) throws(TLSError) {
    var offset = 0
    while offset < bytes.count {
      ERR_clear_error()
      let n = bytes[offset...].withUnsafeBytes { SSL_write(ssl, $0.baseAddress, Int32($0.count)) }
      if n <= 0 { throw diagnose(n) }
      offset += Int(n)
    }
  }

  /// Reads up to `maximum` bytes; an empty result means the server closed the connection.
  public func read(maximum: Int = 16384) throws(TLSError) -> [UInt8] {
    var buffer = [UInt8](repeating: 0, count: maximum)
    ERR_clear_error()
    let n = SSL_read(ssl, &buffer, Int32(maximum))
    if n > 0 { return Array(buffer[0..<Int(n)]) }
    if SSL_get_error(ssl, n) == SSL_ERROR_ZERO_RETURN {
      // A clean close_notify, unless an alert came first.
      var failure = edgekey_tls_failure()
      if edgekey_tls_diagnose(ssl, SSL_ERROR_ZERO_RETURN, &failure) != EDGEKEY_LAYER_NETWORK {
        throw TLSError(failure: failure)
      }
      return []
    }
    throw diagnose(n)
  }

  /// Reads until the server closes the connection or `limit` bytes have arrived.
  public func readAll(limit: Int = 1 << 20) throws(TLSError) -> [UInt8] {
    var all: [UInt8] = []
    while all.count < limit {
      let chunk = try read()
      if chunk.isEmpty { break }
      all += chunk
    }
    return all
  }

  private func diagnose(_ rc: Int32) -> TLSError {
    let sslError = SSL_get_error(ssl, rc)
    // SO_RCVTIMEO/SO_SNDTIMEO ran out: OpenSSL reports the EAGAIN as "want read/write" (or, on
    // some paths, as a syscall error).
    if sslError == SSL_ERROR_WANT_READ || sslError == SSL_ERROR_WANT_WRITE
      || (sslError == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK))
    {
      ERR_clear_error()
      return TLSError(.network, .timedOut, "the server did not answer in time")
    }
    var failure = edgekey_tls_failure()
    edgekey_tls_diagnose(ssl, sslError, &failure)
    return TLSError(failure: failure)
  }

  /// A TCP connection with a connect timeout; reads and writes then time out after `timeout`.
  static func connectTCP(host: String, port: UInt16, timeout: Duration) throws(TLSError) -> Int32 {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_family = AF_UNSPEC
    var result: UnsafeMutablePointer<addrinfo>?
    let rc = getaddrinfo(host, String(port), &hints, &result)
    guard rc == 0, let first = result else {
      throw TLSError(.network, .connectionFailed, "cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
    }
    defer { freeaddrinfo(result) }
    var lastError = "no address"
    var candidate: UnsafeMutablePointer<addrinfo>? = first
    while let info = candidate {
      candidate = info.pointee.ai_next
      let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype, info.pointee.ai_protocol)
      if fd < 0 { continue }
      let flags = fcntl(fd, F_GETFL)
      _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
      var ok = connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0
      if !ok && errno == EINPROGRESS {
        var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        if poll(&pfd, 1, Int32(clamping: max(timeout.milliseconds, 1))) == 1 {
          var soError: Int32 = 0
          var length = socklen_t(MemoryLayout<Int32>.size)
          getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &length)
          ok = soError == 0
          if !ok { lastError = String(cString: strerror(soError)) }
        } else {
          lastError = "connection timed out after \(timeout.secondsText)"
        }
      } else if !ok {
        lastError = String(cString: strerror(errno))
      }
      if ok {
        _ = fcntl(fd, F_SETFL, flags)
        let ms = max(timeout.milliseconds, 1)
        var tv = timeval(tv_sec: Int(ms / 1000), tv_usec: Int(ms % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return fd
      }
      close(fd)
    }
    throw TLSError(.network, .connectionFailed, "cannot connect to \(host):\(port): \(lastError)")
  }
}
