import CEdgeKeyProvider
import COpenSSL
import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

/// Connections that send one byte every few seconds and never finish (slowloris), from the
/// given loopback source addresses; each is opened again as soon as the server drops it.
final class SlowClients: @unchecked Sendable {
  private let lock = NSLock()
  private var stopped = false
  private var opened = 0
  private let done = DispatchSemaphore(value: 0)

  init(port: UInt16, sources: [String], count: Int, interval: Double) {
    Thread.detachNewThread { [self] in
      var sockets: [(fd: Int32, source: String)] = []
      func connectOne(_ source: String) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var local = sockaddr_in()
        local.sin_family = sa_family_t(AF_INET)
        inet_pton(AF_INET, source, &local.sin_addr)
        var remote = sockaddr_in()
        remote.sin_family = sa_family_t(AF_INET)
        remote.sin_port = port.bigEndian
        inet_pton(AF_INET, "127.0.0.1", &remote.sin_addr)
        let size = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &local) {
          $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, size) }
        }
        // Non-blocking connect: a server at its limit leaves us in its queue.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        _ = withUnsafePointer(to: &remote) {
          $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, size) }
        }
        lock.lock()
        opened += 1
        lock.unlock()
        return fd
      }
      for i in 0..<count { sockets.append((connectOne(sources[i % sources.count]), sources[i % sources.count])) }
      // A TLS record header, then nothing but one byte at a time.
      var byte: UInt8 = 0x16
      while true {
        lock.lock()
        let stop = stopped
        lock.unlock()
        if stop { break }
        for i in sockets.indices {
          if send(sockets[i].fd, &byte, 1, Int32(MSG_NOSIGNAL)) < 0 && errno != EAGAIN && errno != ENOTCONN {
            close(sockets[i].fd)
            sockets[i].fd = connectOne(sockets[i].source)
          }
          byte = 0x03
        }
        Thread.sleep(forTimeInterval: interval)
      }
      for s in sockets { close(s.fd) }
      done.signal()
    }
  }

  /// Connections opened so far (the first `count`, plus every reopening).
  var connections: Int {
    lock.lock()
    defer { lock.unlock() }
    return opened
  }

  func stop() {
    lock.lock()
    stopped = true
    lock.unlock()
    done.wait()
  }
}

@Suite("the RA as a server: slow clients, resumed sessions")
struct ServerTests {
  @Test("200 slowloris connections from one address, then from thirteen: a normal client is still served")
  func slowloris() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(ca: ca, password: nil, extraArguments: ["--request-timeout", "3"])
    try ra.importManifest(
      text: "serial,name,secret\nSN-1,device-0001,secret-of-device-one-1\nSN-2,device-0002,secret-of-device-two-2\n")
    let probe = try ESTProbe(ra)
    // One address: 16 are admitted, the rest closed on arrival; the slots left serve others.
    let one = SlowClients(port: ra.port, sources: ["127.0.0.2"], count: 200, interval: 2)
    while one.connections < 200 { usleep(10_000) }
    let first = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-0001")]),
      basic: "SN-1:secret-of-device-one-1")
    #expect(first.status == 200, "\(first.body)")
    one.stop()
    // Thirteen addresses, 208 connections: every slot is taken; each is dropped at the request
    // deadline, so a normal client waits in the queue for one, and is served.
    let many = SlowClients(port: ra.port, sources: (2...14).map { "127.0.0.\($0)" }, count: 208, interval: 2)
    while many.connections < 208 { usleep(10_000) }
    let second = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-0002")]),
      basic: "SN-2:secret-of-device-two-2")
    #expect(second.status == 200, "\(second.body)")
    // The slow connections are dropped at their deadline (and reopened), not held.
    let deadline = Date().addingTimeInterval(60)
    while many.connections <= 208 && Date() < deadline { usleep(50_000) }
    #expect(many.connections > 208, "slow connections were dropped (and reopened)")
    many.stop()
    #expect(ra.log.contains("not finished in time"))
  }

  /// A TLS 1.2 client of our own (OpenSSL), with or without a client certificate, that resumes
  /// its first session on every later connection.
  final class ResumingClient {
    let context: OpaquePointer
    var session: OpaquePointer?
    init(caFile: String, certificate: String? = nil, key: String? = nil) throws {
      context = SSL_CTX_new(TLS_client_method())
      SSL_CTX_ctrl(context, SSL_CTRL_SET_MAX_PROTO_VERSION, Int(TLS1_2_VERSION), nil)
      SSL_CTX_load_verify_locations(context, caFile, nil)
      SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nil)
      if let certificate, let key {
        guard SSL_CTX_use_certificate_chain_file(context, certificate) == 1,
          SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1
        else { throw HarnessError("client certificate") }
      }
    }
    deinit {
      if let session { SSL_SESSION_free(session) }
      SSL_CTX_free(context)
    }

    /// One connection: the handshake (resuming when a session was kept), then the bytes
    /// `request` makes from (tls-unique, our own Finished) sent, and the answer read whole.
    func exchange(port: UInt16, _ request: (_ tlsUnique: [UInt8], _ ourFinished: [UInt8]) throws -> [UInt8]) throws
      -> (resumed: Bool, answer: String)
    {
      let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
      defer { close(fd) }
      var remote = sockaddr_in()
      remote.sin_family = sa_family_t(AF_INET)
      remote.sin_port = port.bigEndian
      inet_pton(AF_INET, "127.0.0.1", &remote.sin_addr)
      let size = socklen_t(MemoryLayout<sockaddr_in>.size)
      let connected = withUnsafePointer(to: &remote) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, size) }
      }
      guard connected == 0 else { throw HarnessError("connect") }
      let ssl = SSL_new(context)!
      defer { SSL_free(ssl) }
      SSL_set_fd(ssl, fd)
      if let session { SSL_set_session(ssl, session) }
      guard SSL_connect(ssl) == 1 else { throw HarnessError("handshake") }
      if session == nil { session = SSL_get1_session(ssl) }
      var unique = [UInt8](repeating: 0, count: 64)
      let n = edgekey_tls_unique(ssl, &unique, unique.count)
      var own = [UInt8](repeating: 0, count: 64)
      let m = SSL_get_finished(ssl, &own, own.count)
      let bytes = try request(Array(unique[0..<Int(max(n, 0))]), Array(own[0..<m]))
      _ = bytes.withUnsafeBytes { SSL_write(ssl, $0.baseAddress, Int32($0.count)) }
      var answer: [UInt8] = []
      var chunk = [UInt8](repeating: 0, count: 4096)
      while true {
        let r = SSL_read(ssl, &chunk, Int32(chunk.count))
        if r <= 0 { break }
        answer += chunk[0..<Int(r)]
      }
      // Without a close_notify of ours OpenSSL marks the session not resumable.
      SSL_shutdown(ssl)
      ERR_clear_error()
      return (SSL_session_reused(ssl) == 1, String(decoding: answer, as: UTF8.self))
    }
  }

  /// An HTTP/1.1 POST of a request to an EST operation.
  func post(_ operation: String, _ csr: [UInt8], basic: String? = nil) -> [UInt8] {
    let body = Base64.encodeLines(csr)
    var head = "POST /.well-known/est/\(operation) HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\n"
    if let basic { head += "Authorization: Basic \(Base64.encode(Array(basic.utf8)))\r\n" }
    head += "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n"
    return Array((head + body).utf8)
  }

  /// The certificate in a 200 answer's PKCS#7 body.
  func certificate(in answer: String) throws -> String {
    guard answer.hasPrefix("HTTP/1.1 200"), let split = answer.range(of: "\r\n\r\n") else {
      throw HarnessError("not a 200: \(answer)")
    }
    let der = Base64.decode(answer[split.upperBound...].filter { !$0.isWhitespace }) ?? []
    return try #require(try ESTProbe.firstCertificate(pkcs7: der))
  }

  @Test(
    "a resumed TLS 1.2 session keeps the client certificate, and its tls-unique is the server's Finished (RFC 5929)")
  func resumedSession() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(
      ca: ca, password: nil, extraArguments: ["--tls-max", "1.2", "--channel-binding"])
    try ra.importManifest(text: "serial,name,secret\nSN-1,device-0001,secret-of-device-one-1\n")
    let probe = try ESTProbe(ra)
    let caFile = try probe.file(ca.certificatePEM)
    let key = try probe.newKey()
    // The first certificate, by secret, bound to its connection.
    let enrolling = try ResumingClient(caFile: caFile)
    let first = try enrolling.exchange(port: ra.port) { unique, _ in
      post(
        "simpleenroll",
        try probe.request(key: key, subject: [.init("CN", "device-0001")], challengePassword: Base64.encode(unique)),
        basic: "SN-1:secret-of-device-one-1")
    }
    let issued = try probe.file(try certificate(in: first.answer))
    // Re-enrolment with it: a full handshake, then a resumed one.
    let device = try ResumingClient(caFile: caFile, certificate: issued, key: key.file)
    func reenroll(useOwnFinished: Bool = false) throws -> (resumed: Bool, answer: String) {
      try device.exchange(port: ra.port) { unique, own in
        post(
          "simplereenroll",
          try probe.request(
            key: try probe.newKey(), subject: [.init("CN", "device-0001")],
            challengePassword: Base64.encode(useOwnFinished ? own : unique)))
      }
    }
    let full = try reenroll()
    #expect(!full.resumed)
    #expect(full.answer.hasPrefix("HTTP/1.1 200"), "\(full.answer)")
    let resumed = try reenroll()
    #expect(resumed.resumed, "the client resumed its session")
    #expect(resumed.answer.hasPrefix("HTTP/1.1 200"), "\(resumed.answer)")
    // On a resumed session the client's Finished is not tls-unique: refused.
    let wrong = try reenroll(useOwnFinished: true)
    #expect(wrong.resumed)
    #expect(wrong.answer.hasPrefix("HTTP/1.1 400"))
    #expect(wrong.answer.contains("tls-unique"))
    #expect(ra.issuanceLog.count == 3)
  }

  @Test("openssl s_client resuming a TLS 1.3 session (-sess_out, -sess_in) re-enrols: the client certificate is kept")
  func resumedWithSClient() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(ca: ca, password: nil)
    try ra.importManifest(text: "serial,name,secret\nSN-1,device-0001,secret-of-device-one-1\n")
    let probe = try ESTProbe(ra)
    let key = try probe.newKey()
    let first = try probe.enroll(
      try probe.request(key: key, subject: [.init("CN", "device-0001")]), basic: "SN-1:secret-of-device-one-1")
    let certificate = try probe.file(try #require(first.certificatePEM))
    let caFile = try probe.file(ca.certificatePEM)
    let session = ra.directory.appendingPathComponent("session.pem").path
    func reenroll(_ sessionOption: String) throws -> String {
      let csr = try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-0001")])
      let result = try Command.runCapturing(
        "openssl",
        [
          "s_client", "-connect", "127.0.0.1:\(ra.port)", "-tls1_3", "-CAfile", caFile, "-cert", certificate, "-key",
          key.file, sessionOption, session, "-ign_eof",
        ], input: Data(post("simplereenroll", csr)))
      return result.stdout
    }
    let full = try reenroll("-sess_out")
    #expect(full.contains("HTTP/1.1 200"), "\(full.suffix(600))")
    #expect(full.contains("New, TLSv1.3"))
    let resumed = try reenroll("-sess_in")
    #expect(resumed.contains("Reused, TLSv1.3"), "\(resumed.prefix(600))")
    #expect(resumed.contains("HTTP/1.1 200"), "the resumed session kept its client certificate: \(resumed.suffix(600))")
  }
}
