import CEdgeKeyProvider
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// An EST server that misbehaves on purpose: the project's HTTPS server with a handler of the
/// test's choosing, in this process. The device's TPM key is real (swtpm).
final class HostileServer: @unchecked Sendable {
  let ca: TestCA
  let server: HTTPSServer

  init(ca: TestCA, limits: HTTPServerLimits = HTTPServerLimits(), handler: @escaping HTTPSServer.Handler) throws {
    self.ca = ca
    let issued = try ca.issueServer()
    var why = [CChar](repeating: 0, count: 256)
    let context: OpaquePointer? = issued.certificate.withCString { chain in
      issued.key.withCString { key in
        var config = edgekey_tls_server_config()
        config.chain_pem = chain
        config.key_pem = key
        return edgekey_tls_server_ctx(&config, &why, why.count)
      }
    }
    guard let context else { throw HarnessError("server context") }
    server = HTTPSServer(context: context, limits: limits, handler: handler)
    try server.start()
  }

  var url: String { "https://localhost:\(server.port)" }
}

@Suite("EST client against hostile servers")
struct HostileServerTests {
  static func pkcs7(_ certificates: [Certificate]) throws -> [UInt8] {
    Array(Base64.encodeLines(try CertsOnlyPKCS7.encode(certificates)).utf8)
  }

  /// Answers the request with a certificate `issue` makes for the request's key.
  static func issuing(_ request: HTTPRequest, _ issue: ([UInt8]) throws -> String) -> HTTPResponse {
    let csr = try! CertificateSigningRequest(
      der: Base64.decode(String(decoding: request.body, as: UTF8.self).filter { !$0.isWhitespace })!)
    return response(try! pkcs7(Certificate.chain(pem: try! issue(csr.publicKeyDER))))
  }

  static func response(_ body: [UInt8], type: String = "application/pkcs7-mime; smime-type=certs-only")
    -> HTTPResponse
  {
    HTTPResponse(status: 200, headers: [("Content-Type", type)], body: body)
  }

  /// Runs `enroll` against a server answering with `handler`; returns the error.
  func enrollError(
    options: ESTOptions = ESTOptions(), handler: @escaping @Sendable (HTTPRequest, TestCA) -> HTTPResponse
  ) throws -> EnrollmentError? {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let key = try tpm.loadKey(try tpm.createKey(.eccP256))
    let ca = try TestCA()
    let hostile = try HostileServer(ca: ca) { request in handler(request, ca) }
    let client = try ESTClient(
      server: try ESTServer(url: hostile.url), trustAnchors: try Certificate.chain(pem: ca.certificatePEM),
      options: options)
    let csr = try CertificateSigningRequest(key: key, subject: [("CN", "device-7")])
    do {
      _ = try client.enroll(csr, authentication: .password(user: "u", password: "p"))
      return nil
    } catch {
      return error
    }
  }

  @Test("garbage, a truncated body and the wrong content type are typed errors")
  func malformed() throws {
    let garbage = try enrollError { _, _ in Self.response(Array("%%% not base64 %%%".utf8)) }
    #expect(garbage?.kind == .malformedResponse)
    let notPKCS7 = try enrollError { _, _ in Self.response(Array(Base64.encode(Array(repeating: 0x30, count: 40)).utf8))
    }
    #expect(notPKCS7?.kind == .malformedResponse)
    let html = try enrollError { _, _ in Self.response(Array("<html>login</html>".utf8), type: "text/html") }
    #expect(html?.kind == .malformedResponse)
    #expect(html?.message.contains("text/html") == true)
    let truncated = try enrollError { _, _ in
      .raw(Array("HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime\r\nContent-Length: 5000\r\n\r\nMIIB".utf8))
    }
    #expect(truncated?.kind == .network || truncated?.kind == .malformedResponse)
  }

  @Test("an oversized answer is cut off, and a slow one times out")
  func oversizedAndSlow() throws {
    var small = ESTOptions()
    small.maximumResponseBytes = 4096
    let huge = try enrollError(options: small) { _, _ in Self.response(Array(repeating: 65, count: 100_000)) }
    #expect(huge?.kind == .responseTooLarge)

    var impatient = ESTOptions()
    impatient.timeout = .seconds(1)
    let slow = try enrollError(options: impatient) { _, _ in
      Thread.sleep(forTimeInterval: 3)
      return .text(500, "too late")
    }
    #expect(slow?.kind == .timedOut)
  }

  @Test("a certificate for another key, or from another CA, is refused and never returned")
  func wrongCertificate() throws {
    let otherKey = try enrollError { request, ca in
      let stranger = try! ca.issueSoftwareClient(commonName: "device-7")
      defer { EVP_PKEY_free(stranger.key) }
      return Self.response(try! Self.pkcs7(Certificate.chain(pem: stranger.certificate)))
    }
    #expect(otherKey?.kind == .certificateRefused)
    #expect(otherKey?.message.contains("no certificate for our key") == true)

    let otherCA = try enrollError { request, _ in
      Self.issuing(request) {
        try TestCA(name: "Rogue CA").issueClient(publicKeyDER: $0, commonName: "device-7").certificate
      }
    }
    #expect(otherCA?.kind == .certificateRefused)
    #expect(otherCA?.message.contains("does not chain to our trust anchor") == true)

    let renamed = try enrollError { request, ca in
      Self.issuing(request) { try ca.issueClient(publicKeyDER: $0, commonName: "someone-else").certificate }
    }
    #expect(renamed?.kind == .certificateRefused)
    #expect(renamed?.message.contains("changed the subject") == true)

    let expired = try enrollError { request, ca in
      Self.issuing(request) {
        try ca.issueClient(publicKeyDER: $0, commonName: "device-7", validFrom: -7200, validFor: 3600).certificate
      }
    }
    #expect(expired?.kind == .certificateRefused)
    #expect(expired?.message.contains("expired") == true)
  }

  @Test("a 202 loop gives up at the bound; a cross-origin redirect is refused; an error keeps its text")
  func loopsRedirectsAndErrors() throws {
    var options = ESTOptions()
    options.maximumPendingWait = .seconds(30)
    let slept = Counter()
    options.sleep = { slept.add($0.seconds) }
    let loop = try enrollError(options: options) { _, _ in
      .text(202, "later", headers: [("Retry-After", "10")])
    }
    #expect(loop?.kind == .pendingTooLong)
    #expect(slept.total == 30)

    let redirect = try enrollError { _, _ in
      HTTPResponse(status: 302, headers: [("Location", "https://evil.example:443/.well-known/est/simpleenroll")])
    }
    #expect(redirect?.kind == .redirectRefused)

    let plain = try enrollError { _, _ in
      .raw(
        Array(
          "HTTP/1.1 400 Bad Request\r\nContent-Length: 26\r\nConnection: close\r\n\r\nCSR subject lacks a serial".utf8))
    }
    #expect(plain?.kind == .server(400))
    #expect(plain?.message == "CSR subject lacks a serial")
  }
}

final class Counter: @unchecked Sendable {
  private let lock = NSLock()
  private var sum: TimeInterval = 0
  func add(_ v: TimeInterval) {
    lock.lock()
    sum += v
    lock.unlock()
  }
  var total: TimeInterval {
    lock.lock()
    defer { lock.unlock() }
    return sum
  }
}
