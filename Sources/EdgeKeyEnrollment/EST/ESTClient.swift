import EdgeKeyCore
import EdgeKeyTLS
import FoundationEssentials

/// Limits and preferences of an EST client.
public struct ESTOptions: Sendable {
  /// The whole of one HTTP exchange.
  public var timeout: Duration = .seconds(30)
  /// The TCP connect and TLS handshake of one exchange.
  public var connectTimeout: Duration = .seconds(10)
  /// EST answers are small: a few certificates.
  public var maximumResponseBytes = 256 * 1024
  /// How long in total `enroll` waits while the server answers 202 (manual approval).
  public var maximumPendingWait: Duration = .seconds(600)
  /// The longest single Retry-After `enroll` waits through. A server that asks for more is
  /// never asked sooner (RFC 7030 §4.2.3: the client MUST wait at least that long): `enroll`
  /// gives up with `.pendingTooLong` carrying the server's time, for the caller to schedule.
  public var maximumRetryAfter: Duration = .seconds(300)
  /// Same-origin redirects followed per request (a bound request follows none).
  public var maximumRedirects = 3
  /// Widely deployed EST servers stop at TLS 1.2, so 1.2 is allowed by default.
  public var minimumVersion: TLSVersion = .tls12
  /// The newest TLS version offered.
  public var maximumVersion: TLSVersion = .tls13
  /// How much the server's clock may be ahead of ours when a certificate's notBefore is checked.
  public var clockSkew: Duration = .seconds(300)
  /// CRLs (PEM) for the EST server's chain, checked at every level of it.
  public var crlPEM: String?
  /// What a level of the server's chain without a CRL here means (with `crlPEM`).
  public var missingCRL: TLSPolicy.MissingCRL = .fail
  /// Accept an EST server certificate with no extended key usage at all (RFC 5280 reads it as
  /// unrestricted). Off: it must name serverAuth or id-kp-cmcRA (RFC 7030 §3.6.1 allows both).
  public var allowServerCertificateWithoutEKU = false
  /// Sleeps between 202 answers; replaceable so that tests need not wait. Nil: a sleep that
  /// `cancellation` ends at once.
  public var sleep: (@Sendable (Duration) -> Void)? = nil
  /// Ends every transfer and wait of this client within about a second when cancelled.
  public var cancellation: ESTCancellation?
  /// Each wait for the server (202 Retry-After) and each HTTP authentication challenge answered.
  public var logger: Logger = .disabled

  /// The defaults above.
  public init() {}
}

/// Where an EST server is: `https://host[:port]`, and an optional label
/// (`/.well-known/est/<label>/`).
public struct ESTServer: Sendable, Equatable {
  /// Always "https".
  public let scheme: String
  /// The server's host name or IP address, as in the URL.
  public let host: String
  /// The TCP port (443 when the URL names none).
  public let port: Int
  /// The EST label (RFC 7030 §3.2.2), or nil for the default CA.
  public let label: String?

  /// Reads `https://host[:port]`; `.configuration` for another scheme or what is not a URL.
  public init(url: String, label: String? = nil) throws(EnrollmentError) {
    guard let parsed = URLComponents(string: url), let scheme = parsed.scheme?.lowercased(), let host = parsed.host,
      !host.isEmpty
    else { throw EnrollmentError(.configuration, "\(url) is not a URL") }
    guard scheme == "https" else { throw EnrollmentError(.configuration, "EST runs over https only, not \(scheme)") }
    self.scheme = scheme
    self.host = host
    self.port = parsed.port ?? 443
    self.label = label
  }

  /// The host as the server's certificate must name it.
  public var serverName: String { host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host }

  var origin: String { "\(scheme)://\(host.contains(":") && !host.hasPrefix("[") ? "[\(host)]" : host):\(port)" }

  func url(_ operation: String) -> String {
    origin + "/.well-known/est/" + (label.map { "\($0)/" } ?? "") + operation
  }
}

/// An EST client (RFC 7030, with the RFC 8951 clarifications) over libcurl, presenting the
/// TPM-held key through the same TLS identity code as MQTT.
public final class ESTClient: Sendable {
  /// The server this client talks to.
  public let server: ESTServer
  /// The CA certificates the server's certificate must chain to, and issued ones too.
  public let trustAnchors: [Certificate]
  /// Its limits and preferences.
  public let options: ESTOptions

  /// A client for `server`, trusting `trustAnchors` for its TLS certificate (and, unless the
  /// caller checks otherwise, for what it issues). Makes no connection yet.
  public init(server: ESTServer, trustAnchors: [Certificate], options: ESTOptions = ESTOptions())
    throws(EnrollmentError)
  {
    guard !trustAnchors.isEmpty else {
      throw EnrollmentError(.configuration, "no trust anchor: give the CA certificate(s) or bootstrap with a pin")
    }
    self.server = server
    self.trustAnchors = trustAnchors
    self.options = options
  }

  // MARK: - Operations

  /// `/cacerts`: the CA certificates the server publishes now (they change at a CA rollover).
  public func caCertificates() throws(EnrollmentError) -> [Certificate] {
    let answer = try exchange("GET", "cacerts", body: [], contentType: nil, authentication: .none)
    return try ESTClient.certificates(in: answer, what: "cacerts")
  }

  /// Fetches `/cacerts` over a channel that is not verified, and keeps the answer only when it
  /// holds a CA certificate whose SHA-256 fingerprint is `pinnedFingerprint` (hex, colons
  /// allowed): the first trust anchor of a device that has none. Returns the pinned anchor and
  /// everything the server sent.
  public static func bootstrapCACertificates(
    server: ESTServer, pinnedFingerprint: String, options: ESTOptions = ESTOptions()
  ) throws(EnrollmentError) -> (anchor: Certificate, all: [Certificate]) {
    let pin = pinnedFingerprint.lowercased().filter { $0.isHexDigit }
    guard pin.count == 64 else {
      throw EnrollmentError(.configuration, "the pinned fingerprint must be a SHA-256 (64 hex digits)")
    }
    let answer = try perform(
      server: server, options: options, method: "GET", operation: "cacerts", body: [], contentType: nil,
      authentication: .none, trustAnchorsPEM: nil)
    let all = try certificates(in: answer, what: "cacerts")
    guard let anchor = all.first(where: { $0.fingerprint == pin && $0.isCA }) else {
      throw EnrollmentError(
        .pinMismatch,
        "no CA certificate from \(server.host) has the pinned fingerprint; it sent \(all.map { "\($0.subject) \($0.fingerprint)" }.joined(separator: ", "))"
      )
    }
    return (anchor, all)
  }

  /// `/csrattrs`: the attribute and key-type OIDs the server wants in requests (dotted text);
  /// empty when it has no preference (204).
  public func csrAttributes(authentication: ESTAuthentication = .none) throws(EnrollmentError) -> [String] {
    let answer = try exchange("GET", "csrattrs", body: [], contentType: nil, authentication: authentication)
    if answer.status == 204 || answer.body.isEmpty { return [] }
    guard let der = ESTBody.decode(answer.body) else {
      throw EnrollmentError(.malformedResponse, "csrattrs is not base64")
    }
    return ESTBody.objectIdentifiers(in: der)
  }

  /// `/csrattrs`, read: what the server wants in our request (key type, signature hash,
  /// challengePassword, extensions), and what we do not understand of it; nil when it has no
  /// preference (204, or an empty answer).
  public func requestedAttributes(authentication: ESTAuthentication = .none) throws(EnrollmentError)
    -> CSRAttributes?
  {
    let answer = try exchange("GET", "csrattrs", body: [], contentType: nil, authentication: authentication)
    if answer.status == 204 || answer.body.isEmpty { return nil }
    guard let der = ESTBody.decode(answer.body) else {
      throw EnrollmentError(.malformedResponse, "csrattrs is not base64")
    }
    return try CSRAttributes(der: der)
  }

  /// `/simpleenroll`: sends `csr` and returns the issued chain (our certificate first), after
  /// checking that it is for our key, subject and names, allows clientAuth, is in its validity
  /// period and chains to a trust anchor. Waits through 202 answers up to
  /// `options.maximumPendingWait`.
  public func enroll(_ csr: CertificateSigningRequest, authentication: ESTAuthentication) throws(EnrollmentError)
    -> [Certificate]
  {
    try enroll(operation: "simpleenroll", authentication: authentication, bound: false) { _ in csr }
  }

  /// `/simplereenroll`: the same with the current certificate as the TLS client certificate.
  public func reenroll(_ csr: CertificateSigningRequest, authentication: ESTAuthentication) throws(EnrollmentError)
    -> [Certificate]
  {
    try enroll(operation: "simplereenroll", authentication: authentication, bound: false) { _ in csr }
  }

  /// `/simpleenroll` (or `/simplereenroll`) with the request bound to its TLS connection
  /// (RFC 7030 §3.5, RFC 5929): the connection is opened with a `cacerts` GET, `makeRequest`
  /// gets that connection's tls-unique, base64, to put in the challengePassword, and the request
  /// it returns is sent on the same connection. A server that checks the binding knows the
  /// request was made by the party at this end of this TLS connection. TLS 1.2 only: tls-unique
  /// does not exist in TLS 1.3 (set `options.maximumVersion = .tls12`).
  public func enroll(
    bindingTo makeRequest: @escaping (String) throws(EnrollmentError) -> CertificateSigningRequest,
    reenroll: Bool = false, authentication: ESTAuthentication
  ) throws(EnrollmentError) -> [Certificate] {
    try enroll(
      operation: reenroll ? "simplereenroll" : "simpleenroll", authentication: authentication, bound: true
    ) { unique throws(EnrollmentError) in try makeRequest(unique ?? "") }
  }

  /// The enrollment exchange: the request (`makeRequest` gets the connection's tls-unique when
  /// `bound`, nil otherwise), 202 answers waited through up to `options.maximumPendingWait`, and
  /// the issued chain checked against the request that was sent.
  private func enroll(
    operation: String, authentication: ESTAuthentication, bound: Bool,
    makeRequest: @escaping (String?) throws(EnrollmentError) -> CertificateSigningRequest
  ) throws(EnrollmentError) -> [Certificate] {
    if operation == "simplereenroll" && authentication.certificateChain.isEmpty {
      throw EnrollmentError(.configuration, "re-enrollment authenticates with the current certificate")
    }
    // RFC 8951: base64 of the DER request; lines of 64 ending in a newline, which every server reads.
    func body(_ csr: CertificateSigningRequest) -> [UInt8] { Array(Base64.encodeLines(csr.der).utf8) }
    var waited = Duration.zero
    while true {
      var sent: CertificateSigningRequest?
      let answer: HTTPAnswer
      if bound {
        let binding = HTTPSTransport.Binding(url: server.url("cacerts")) { unique throws(EnrollmentError) -> [UInt8] in
          let csr = try makeRequest(Base64.encode(unique))
          sent = csr
          return body(csr)
        }
        answer = try ESTClient.perform(
          server: server, options: options, method: "POST", operation: operation, body: [],
          contentType: "application/pkcs10", authentication: authentication,
          trustAnchorsPEM: trustAnchors.map(\.pem).joined(), binding: binding)
      } else {
        let csr = try makeRequest(nil)
        sent = csr
        answer = try exchange(
          "POST", operation, body: body(csr), contentType: "application/pkcs10", authentication: authentication)
      }
      if answer.status == 202 {
        // RFC 7030 §4.2.3: wait at least Retry-After. Never shortened: a wait beyond what we
        // wait here ends the attempt, with the server's time for the caller to schedule.
        let delay = Duration.seconds(max(ESTBody.retryAfter(answer.retryAfter) ?? 60, 0))
        let shown = answer.retryAfter.isEmpty ? "absent, 60 s assumed" : answer.retryAfter
        guard delay <= options.maximumRetryAfter, waited + delay <= options.maximumPendingWait else {
          throw EnrollmentError(
            .pendingTooLong,
            "the server answers 202 and asks us to come back in \(Text.fixed(delay.seconds, 0)) s (Retry-After \(shown)) "
              + "after \(Text.fixed(waited.seconds, 0)) s of waiting; this attempt waits at most "
              + "\(Text.fixed(options.maximumRetryAfter.seconds, 0)) s at a time and "
              + "\(Text.fixed(options.maximumPendingWait.seconds, 0)) s in all",
            retryAfter: delay)
        }
        options.logger.info(
          "\(operation): 202, waiting \(Text.fixed(delay.seconds, 0)) s as the server asks (Retry-After \(shown))")
        try ESTClient.wait(delay, options: options)
        waited += delay
        continue
      }
      guard let csr = sent else { throw EnrollmentError(.malformedResponse, "no request was sent") }
      let bag = try ESTClient.certificates(in: answer, what: operation)
      return try IssuedCertificateCheck.validate(
        bag, for: csr, anchors: trustAnchors, at: Date(), clockSkew: options.clockSkew)
    }
  }

  /// Sleeps `delay` (the replaceable `options.sleep`, or a wait `options.cancellation` ends).
  static func wait(_ delay: Duration, options: ESTOptions) throws(EnrollmentError) {
    if let sleep = options.sleep {
      sleep(delay)
    } else if let cancellation = options.cancellation {
      cancellation.sleep(delay)
    } else {
      Threads.sleep(delay.seconds)
    }
    if options.cancellation?.isCancelled == true {
      throw EnrollmentError(.cancelled, "stopped while waiting for the server")
    }
  }

  // MARK: - HTTP

  private func exchange(
    _ method: String, _ operation: String, body: [UInt8], contentType: String?, authentication: ESTAuthentication
  ) throws(EnrollmentError) -> HTTPAnswer {
    try ESTClient.perform(
      server: server, options: options, method: method, operation: operation, body: body, contentType: contentType,
      authentication: authentication, trustAnchorsPEM: trustAnchors.map(\.pem).joined())
  }

  /// One EST exchange, following same-origin redirects only, and turning HTTP errors into typed ones.
  static func perform(
    server: ESTServer, options: ESTOptions, method: String, operation: String, body: [UInt8], contentType: String?,
    authentication: ESTAuthentication, trustAnchorsPEM: String?, binding: HTTPSTransport.Binding? = nil
  ) throws(EnrollmentError) -> HTTPAnswer {
    var url = server.url(operation)
    var authentication = authentication
    var answeredChallenge = false
    // A bound request follows no redirect: the binding is to this connection.
    for _ in 0...(binding == nil ? options.maximumRedirects + 1 : 1) {
      if options.cancellation?.isCancelled == true { throw EnrollmentError(.cancelled, "stopped") }
      let answer = try HTTPSTransport.perform(
        HTTPSTransport.Request(
          method: method, url: url, contentType: contentType, body: body, authentication: authentication,
          trustAnchorsPEM: trustAnchorsPEM, serverName: server.serverName, minimumVersion: options.minimumVersion,
          maximumVersion: options.maximumVersion, crlPEM: options.crlPEM, missingCRL: options.missingCRL,
          allowNoEKU: options.allowServerCertificateWithoutEKU, timeout: options.timeout,
          connectTimeout: options.connectTimeout,
          maximumResponseBytes: options.maximumResponseBytes, binding: binding, cancellation: options.cancellation))
      switch answer.status {
      case 200, 202, 204: return answer
      case 401:
        // RFC 7030 §3.2.3: a server may want HTTP authentication besides the client
        // certificate, and says so with a challenge (RFC 7235). Answered once, with the
        // credentials we hold for it; the server's reason is kept either way.
        let challenge = answer.wwwAuthenticate
        let basic = challenge.split(separator: " ").first?.lowercased() == "basic"
        if basic, !answeredChallenge, authentication.username == nil,
          let credentials = authentication.challengeCredentials
        {
          options.logger.info("\(operation): the server asks for HTTP authentication (\(challenge)); answering it")
          authentication.username = credentials.user
          authentication.password = credentials.password
          answeredChallenge = true
          continue
        }
        let asked = challenge.isEmpty ? "no WWW-Authenticate challenge" : "challenge: \(challenge)"
        let why =
          answeredChallenge || authentication.username != nil
          ? "our credentials were not accepted"
          : basic ? "no credentials to answer it with (an enrollment password)" : "a scheme we do not answer"
        throw EnrollmentError(.server(401), "\(ESTBody.message(answer.body)) (\(asked); \(why))")
      case 301, 302, 303, 307, 308:
        guard !answer.location.isEmpty else {
          throw EnrollmentError(.malformedResponse, "a redirect (\(answer.status)) without a Location")
        }
        let target = answer.location.hasPrefix("/") ? server.origin + answer.location : answer.location
        guard let next = try? ESTServer(url: target), next.origin == server.origin else {
          throw EnrollmentError(
            .redirectRefused,
            "the server redirected \(operation) to \(answer.location), another origin than \(server.origin)")
        }
        url = target
      default:
        throw EnrollmentError(.server(answer.status), ESTBody.message(answer.body))
      }
    }
    throw EnrollmentError(.redirectRefused, "more than \(options.maximumRedirects) redirects")
  }

  static func certificates(in answer: HTTPAnswer, what: String) throws(EnrollmentError) -> [Certificate] {
    guard answer.status == 200 else {
      throw EnrollmentError(.malformedResponse, "\(what) answered \(answer.status) with no certificates")
    }
    let mediaType = answer.contentType.split(separator: ";").first?.trimmingSpaces().lowercased()
    guard mediaType == "application/pkcs7-mime" || mediaType == "application/x-pkcs7-certificates" else {
      throw EnrollmentError(
        .malformedResponse,
        "\(what) answered \(answer.contentType.isEmpty ? "no content type" : answer.contentType), not application/pkcs7-mime"
      )
    }
    guard let der = ESTBody.decode(answer.body) else {
      throw EnrollmentError(.malformedResponse, "\(what) is neither base64 nor DER")
    }
    do {
      return try CertsOnlyPKCS7.decode(der)
    } catch {
      throw EnrollmentError(.malformedResponse, "\(what): \(error.reason)")
    }
  }
}
