import EdgeKeyCore
import EdgeKeyTLS
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// What the registration authority allows and how it answers.
public struct ESTPolicy: Sendable {
  /// What `cacerts` returns: the CA chain, plus any rollover certificates (old-with-new, ...).
  public var caCertificates: [Certificate]
  /// HTTP Basic credentials that allow a first enrollment (a factory's bootstrap secret).
  public var bootstrapUser: String?
  /// The bootstrap password (compared in constant time; never logged).
  public var bootstrapPassword: String?
  /// CAs whose client certificates allow a first enrollment (manufacturer/bootstrap identities).
  public var bootstrapCAs: [Certificate]
  /// Lifetime of issued certificates (whole seconds; seconds are allowed, so that tests renew
  /// quickly).
  public var lifetime: Duration
  /// How far before now notBefore is put (clock skew between the station and devices).
  public var backdate: Duration
  /// Answer 202 with Retry-After this many times per key before issuing.
  public var pendingTries: Int
  /// The Retry-After of those 202 answers (sent in whole seconds, rounded up).
  public var retryAfter: Duration
  /// Key types accepted, as `CertificateSigningRequest.keyType` names them.
  public var acceptedKeyTypes: Set<String>
  /// Require the tls-unique channel binding in the challengePassword on TLS 1.2 (RFC 7030 §3.5).
  public var requireChannelBinding: Bool
  /// The label this RA answers to (`/.well-known/est/<label>/...`); nil accepts none.
  public var label: String?
  /// An append-only JSON-lines issuance log, fsync'd per issuance.
  public var issuanceLogPath: String?
  /// HTTP Basic credentials re-enrollment needs in addition to the current certificate (RFC 7030
  /// §3.2.3 lets a server ask for both); nil: the certificate is enough.
  public var reenrollUser: String?
  /// The re-enrollment password (compared in constant time; never logged).
  public var reenrollPassword: String?
  /// The DER `csrattrs` answers with; nil: challengePassword, EC P-256, ECDSA with SHA-256.
  public var csrAttributesDER: [UInt8]?
  /// Put in every issued certificate's CRL distribution points (where brokers and devices
  /// fetch the CRL: this RA's `/crl`, or a mirror).
  public var crlDistributionPoint: String?
  /// Enrollment requests allowed per source address and per credential.
  public var rateLimits = RateLimits()

  /// A policy issuing from `caCertificates` under these rules.
  public init(
    caCertificates: [Certificate], bootstrapUser: String? = nil, bootstrapPassword: String? = nil,
    bootstrapCAs: [Certificate] = [], lifetime: Duration = .seconds(30 * 86400),
    backdate: Duration = .seconds(60), pendingTries: Int = 0, retryAfter: Duration = .seconds(1),
    acceptedKeyTypes: Set<String> = ["EC P-256", "EC P-384", "RSA 2048", "RSA 3072", "RSA 4096"],
    requireChannelBinding: Bool = false, label: String? = nil, issuanceLogPath: String? = nil
  ) {
    self.caCertificates = caCertificates
    self.bootstrapUser = bootstrapUser
    self.bootstrapPassword = bootstrapPassword
    self.bootstrapCAs = bootstrapCAs
    self.lifetime = lifetime
    self.backdate = backdate
    self.pendingTries = pendingTries
    self.retryAfter = retryAfter
    self.acceptedKeyTypes = acceptedKeyTypes
    self.requireChannelBinding = requireChannelBinding
    self.label = label
    self.issuanceLogPath = issuanceLogPath
  }
}

/// EST (RFC 7030 with RFC 8951) over `HTTPSServer`: cacerts, csrattrs, simpleenroll,
/// simplereenroll. A bad request gets the RFC's status and a text reason, and changes nothing.
public final class ESTService: @unchecked Sendable {
  // @unchecked: `pending` and the log are guarded by `lock`.
  /// The CA that signs.
  public let ca: CertificateAuthority
  /// Who may enroll, for how long, and how.
  public let policy: ESTPolicy
  /// Who may be issued which name; every certificate is recorded here before it is handed out.
  public let registry: DeviceRegistry
  /// Which names a device may have in its certificate.
  public let naming: NamingPolicy
  /// The CRL served at `/crl` (DER) and `/crl.pem`, when revocation is published.
  public let revocation: CRLPublisher?
  /// Key attestation: nonces, credential activation, evidence checks (nil: not offered, and
  /// evidence in requests is ignored).
  package let attestation: AttestationService?
  private let limiter: RateLimiter
  private let logger: Logger
  private let lock = NSLock()
  private var pending: [String: Int] = [:]
  private var issuedCount = 0

  /// - Parameters:
  ///   - logger: refusals (with their reason, never a secret) and shared-password issuances.
  public init(
    ca: CertificateAuthority, policy: ESTPolicy, registry: DeviceRegistry, naming: NamingPolicy = NamingPolicy(),
    revocation: CRLPublisher? = nil, attestation: AttestationPolicy? = nil, logger: Logger = .disabled
  ) {
    self.attestation = attestation.map { AttestationService(policy: $0, ca: ca, registry: registry, logger: logger) }
    self.ca = ca
    self.policy = policy
    self.registry = registry
    self.naming = naming
    self.revocation = revocation
    self.logger = logger
    limiter = RateLimiter(policy.rateLimits)
  }

  /// Certificates issued since start.
  public var issued: Int {
    lock.lock()
    defer { lock.unlock() }
    return issuedCount
  }

  /// Answers one request (`/.well-known/est/...`, `/crl`, the attestation endpoints).
  public func handle(_ request: HTTPRequest) -> HTTPResponse {
    if request.path == "/crl" || request.path == "/crl.pem" {
      guard request.method == "GET" else { return .text(405, "use GET", headers: [("Allow", "GET")]) }
      return revocationList(pem: request.path.hasSuffix(".pem"))
    }
    let prefix = "/.well-known/est/"
    guard request.path.hasPrefix(prefix) else { return .text(404, "not an EST path") }
    let parts = request.path.dropFirst(prefix.count).split(separator: "/", omittingEmptySubsequences: false)
    let operation: Substring
    switch parts.count {
    case 1: operation = parts[0]
    case 2:
      guard policy.label == String(parts[0]) else { return .text(404, "unknown label \(parts[0])") }
      operation = parts[1]
    default: return .text(404, "not an EST path")
    }
    switch operation {
    case "cacerts":
      guard request.method == "GET" else { return .text(405, "use GET", headers: [("Allow", "GET")]) }
      return certsOnly(policy.caCertificates)
    case "csrattrs":
      guard request.method == "GET" else { return .text(405, "use GET", headers: [("Allow", "GET")]) }
      return csrAttributes()
    case "simpleenroll", "simplereenroll":
      guard request.method == "POST" else { return .text(405, "use POST", headers: [("Allow", "POST")]) }
      return enroll(request, renewal: operation == "simplereenroll")
    case "nonce", "attest-activate", "attest-akcert":
      guard request.method == "POST" else { return .text(405, "use POST", headers: [("Allow", "POST")]) }
      return attest(request, operation: String(operation))
    default:
      return .text(404, "unknown EST operation \(operation)")
    }
  }

  // MARK: - Operations

  private func certsOnly(_ certificates: [Certificate]) -> HTTPResponse {
    do {
      let der = try CertsOnlyPKCS7.encode(certificates)
      return HTTPResponse(
        status: 200,
        headers: [
          ("Content-Type", "application/pkcs7-mime; smime-type=certs-only"), ("Content-Transfer-Encoding", "base64"),
        ],
        body: Array(ESTService.base64Lines(der).utf8))
    } catch {
      return .text(500, "cannot encode certificates: \(error.reason)")
    }
  }

  /// The current CRL: DER as `application/pkix-crl` (RFC 2585 §4.2), or PEM.
  private func revocationList(pem: Bool) -> HTTPResponse {
    guard let revocation else { return .text(404, "this registration authority does not publish a CRL") }
    do {
      let crl = try revocation.current()
      return pem
        ? HTTPResponse(status: 200, headers: [("Content-Type", "application/x-pem-file")], body: Array(crl.pem.utf8))
        : HTTPResponse(status: 200, headers: [("Content-Type", "application/pkix-crl")], body: crl.der)
    } catch {
      return .text(503, "the CRL cannot be made: \(error)", headers: [("Retry-After", "5")])
    }
  }

  /// The attributes a device should put in its request: challengePassword (for channel
  /// binding), an EC P-256 key, ECDSA with SHA-256 (RFC 7030 §4.5.2), and key attestation
  /// when this RA checks it.
  private func csrAttributes() -> HTTPResponse {
    let challengePassword: [UInt8] = [0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x07]
    // Attribute { id-ecPublicKey, { secp256r1 } }
    let ecKey: [UInt8] = [
      0x30, 0x15, 0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01, 0x31, 0x0A, 0x06, 0x08, 0x2A, 0x86, 0x48,
      0xCE, 0x3D, 0x03, 0x01, 0x07,
    ]
    let ecdsaSHA256: [UInt8] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02]
    // id-aa-attestation, when this RA checks key attestation: the device should send evidence.
    let attestationOID: [UInt8] =
      attestation == nil ? [] : [0x06, 0x0B, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x10, 0x02, 0x3B]
    let content = challengePassword + ecKey + ecdsaSHA256 + attestationOID
    let der: [UInt8] = policy.csrAttributesDER ?? ([0x30, UInt8(content.count)] + content)
    return HTTPResponse(
      status: 200, headers: [("Content-Type", "application/csrattrs"), ("Content-Transfer-Encoding", "base64")],
      body: Array(ESTService.base64Lines(der).utf8))
  }

  private func enroll(_ request: HTTPRequest, renewal: Bool) -> HTTPResponse {
    let contentType = request.header("content-type")?.split(separator: ";").first?
      .trimmingCharacters(in: .whitespaces).lowercased()
    guard contentType == "application/pkcs10" else {
      return .text(415, "the request must be application/pkcs10, not \(contentType ?? "none")")
    }
    guard let der = ESTService.decodeBase64(request.body), !der.isEmpty else {
      return .text(400, "the body is not base64")
    }
    let csr: CertificateSigningRequest
    do { csr = try CertificateSigningRequest(der: der) } catch { return .text(400, "bad request: \(error.reason)") }
    guard policy.acceptedKeyTypes.contains(csr.keyType) else {
      return .text(
        400, "key type \(csr.keyType) is not accepted (\(policy.acceptedKeyTypes.sorted().joined(separator: ", ")))")
    }
    guard csr.subjectFields.contains(where: { $0.0 == "CN" }) else {
      return .text(400, "the request's subject has no common name")
    }
    if policy.requireChannelBinding && request.tlsVersion == 0x0303 {
      guard csr.challengePassword == Base64.encode(request.tlsUnique) else {
        return .text(400, "the challengePassword does not carry this connection's tls-unique value")
      }
    }

    // Who is asking, and on what credential.
    let claim: EnrolmentClaim
    if renewal {
      guard let current = request.clientCertificates.first else {
        // RFC 7235 §3.1: a 401 names a challenge. The certificate is what is missing here.
        return .text(
          401, "re-enrollment requires the current certificate as the TLS client certificate",
          headers: [("WWW-Authenticate", "Basic realm=\"EST\"")])
      }
      guard issuedHere(request.clientCertificates) else {
        return refuse(403, "the client certificate was not issued by this CA", request)
      }
      guard current.subject == csr.subject,
        Set(current.subjectAlternativeNames) == Set(csr.subjectAlternativeNames)
      else {
        return refuse(
          403,
          "re-enrollment must keep the subject and subject alternative names: certificate \(current.subject), request \(csr.subject)",
          request)
      }
      if let user = policy.reenrollUser, let password = policy.reenrollPassword {
        guard let (u, p) = ESTService.basicCredentials(request.header("authorization")), u == user,
          ESTService.constantTimeEqual(Array(p.utf8), Array(password.utf8))
        else {
          return .text(
            401, "re-enrollment needs HTTP authentication besides the certificate",
            headers: [("WWW-Authenticate", "Basic realm=\"EST re-enrollment\"")])
        }
      }
      claim = .renewal(current)
    } else if let first = firstEnrolmentClaim(request) {
      claim = first
    } else {
      return .text(401, "authentication required", headers: [("WWW-Authenticate", "Basic realm=\"EST\"")])
    }
    if let limited = rateLimited(request, claim, operation: renewal ? "simplereenroll" : "simpleenroll") {
      return limited
    }

    // A configured number of 202s first (a CA that needs manual approval).
    let keyID = Certificate.sha256Hex(csr.publicKeyDER)
    lock.lock()
    let seen = pending[keyID, default: 0]
    if seen < policy.pendingTries { pending[keyID] = seen + 1 }
    lock.unlock()
    if seen < policy.pendingTries {
      return .text(
        202, "pending approval", headers: [("Retry-After", String(Int64(policy.retryAfter.seconds.rounded(.up))))])
    }

    let operation = renewal ? "simplereenroll" : "simpleenroll"
    // Key attestation, when this RA checks it: the evidence must verify and its nonce must be
    // one this RA gave the same credential, unused (it is used up here, whatever follows).
    var verified: VerifiedKeyAttestation? = nil
    if let attestation {
      let evidence: KeyAttestation?
      do { evidence = try csr.keyAttestation() } catch { return .text(400, "bad request: \(error.reason)") }
      if let evidence {
        do {
          let v = try EvidenceVerifier.verify(evidence, for: csr, anchors: ca.chain + policy.caCertificates)
          if let why = attestation.consumeNonce(v.nonce, owner: claim.rateKey) { return refuse(403, why, request) }
          verified = v
        } catch {
          return refuse(403, "key attestation refused: \(error)", request)
        }
      }
    }
    let outcome: IssuanceOutcome
    do {
      outcome = try registry.issue(
        claim, csr: csr, naming: naming, operation: operation, source: "est \(request.peerAddress)",
        attestation: verified, requireAttestation: attestation?.policy.requireForAll ?? false
      ) { device throws(RAError) in
        let name = csr.subjectFields.first { $0.0 == "CN" }?.1 ?? ""
        let allowed = Set(naming.allowedSubjectAlternativeNames(for: name))
        let sans = csr.subjectAlternativeNames.filter { allowed.contains($0.description) }
        let certificate = try ca.issue(
          for: csr, subjectAlternativeNames: sans, lifetime: policy.lifetime, backdate: policy.backdate,
          crlDistributionPoint: policy.crlDistributionPoint)
        // The issuance log is written before the registry commits: a certificate is handed
        // out only when both have it.
        do {
          try logIssuance(
            certificate, operation: operation, device: device.id, claim: claim, attestation: verified)
        } catch {
          throw RAError("the issuance log cannot be written: \(error)")
        }
        return certificate
      }
    } catch {
      // An issuance that cannot be recorded is not handed out.
      return .text(500, "the registry cannot be written: \(error)")
    }
    switch outcome {
    case .refused(let refusal):
      if refusal.status == 401 {
        log("refused \(operation) from \(request.peerAddress): \(refusal.reason)")
        return .text(401, refusal.reason, headers: [("WWW-Authenticate", "Basic realm=\"EST\"")])
      }
      return refuse(refusal.status, refusal.reason, request)
    case .issued(let certificate, let device):
      if case .sharedPassword(let user) = claim {
        log("issued \(certificate.subject) to \(device) on the SHARED password of \(user) (--allow-shared-password)")
      }
      lock.lock()
      issuedCount += 1
      pending[keyID] = nil
      lock.unlock()
      return certsOnly([certificate] + ca.chain.filter { !isSelfSigned($0) })
    }
  }

  /// The attestation endpoints: authenticated as enrollment is (a certificate of this CA, a
  /// bootstrap certificate, a device's one-time secret), rate-limited alike.
  private func attest(_ request: HTTPRequest, operation: String) -> HTTPResponse {
    guard let attestation else { return .text(404, "this registration authority does not offer key attestation") }
    let claim: EnrolmentClaim
    if let current = request.clientCertificates.first, issuedHere(request.clientCertificates) {
      claim = .renewal(current)
    } else if let first = firstEnrolmentClaim(request) {
      claim = first
    } else {
      return .text(401, "authentication required", headers: [("WWW-Authenticate", "Basic realm=\"EST\"")])
    }
    if let limited = rateLimited(request, claim, operation: operation) { return limited }
    let device: String
    do {
      switch try registry.authenticate(claim) {
      case .success(let id): device = id
      case .failure(let refusal):
        log("refused \(operation) from \(request.peerAddress): \(refusal.reason)")
        return refusal.status == 401
          ? .text(401, refusal.reason, headers: [("WWW-Authenticate", "Basic realm=\"EST\"")])
          : .text(refusal.status, refusal.reason)
      }
    } catch {
      return .text(500, "the registry cannot be read: \(error)")
    }
    let source = "est \(request.peerAddress)"
    switch operation {
    case "nonce": return attestation.nonceResponse(owner: claim.rateKey)
    case "attest-activate":
      return attestation.activate(request.body, device: device, owner: claim.rateKey, source: source)
    default:
      return attestation.certifyAttestationKey(request.body, device: device, owner: claim.rateKey, source: source)
    }
  }

  /// The credential a first enrollment presents: a bootstrap certificate of a bootstrap CA, the
  /// shared password (when allowed), or a device's one-time secret; nil for none.
  private func firstEnrolmentClaim(_ request: HTTPRequest) -> EnrolmentClaim? {
    if let bootstrap = request.clientCertificates.first,
      request.clientCertificates.dropFirst().contains(where: { c in policy.bootstrapCAs.contains { $0.der == c.der } })
    {
      return .bootstrap(bootstrap)
    }
    guard let (u, p) = ESTService.basicCredentials(request.header("authorization")) else { return nil }
    if naming.sharedPasswordPattern != nil, let user = policy.bootstrapUser, let password = policy.bootstrapPassword,
      u == user, ESTService.constantTimeEqual(Array(p.utf8), Array(password.utf8))
    {
      return .sharedPassword(user: u)
    }
    return .secret(device: u, secret: p)
  }

  /// A 429 with Retry-After when this source or credential is over its rate, logged; nil to go on.
  private func rateLimited(_ request: HTTPRequest, _ claim: EnrolmentClaim, operation: String) -> HTTPResponse? {
    guard let wait = limiter.admit(source: request.peerAddress, credential: claim.rateKey) else { return nil }
    let seconds = Int(wait.rounded(.up))
    log("refused \(operation) from \(request.peerAddress): rate limit (\(claim.rateKey)), retry in \(seconds) s")
    return .text(
      429, "too many requests from this address or credential; retry after \(seconds) s",
      headers: [("Retry-After", String(seconds))])
  }

  private func refuse(_ status: Int, _ reason: String, _ request: HTTPRequest) -> HTTPResponse {
    log(
      "refused \(request.path.hasSuffix("reenroll") ? "simplereenroll" : "simpleenroll") from \(request.peerAddress): \(reason)"
    )
    return .text(status, reason)
  }

  private func log(_ line: String) { logger.info(line) }

  private func issuedHere(_ chain: [Certificate]) -> Bool {
    let ours = Set(policy.caCertificates.map(\.der) + ca.chain.map(\.der))
    return chain.dropFirst().contains { ours.contains($0.der) }
  }

  private func isSelfSigned(_ c: Certificate) -> Bool { c.subject == c.issuer }

  private func logIssuance(
    _ certificate: Certificate, operation: String, device: String, claim: EnrolmentClaim,
    attestation: VerifiedKeyAttestation?
  ) throws(FileError) {
    guard let path = policy.issuanceLogPath else { return }
    let authenticatedBy: String
    switch claim {
    case .secret(let id, _): authenticatedBy = "one-time secret of \(id)"
    case .bootstrap(let c): authenticatedBy = "bootstrap certificate \(c.subject)"
    case .sharedPassword(let user): authenticatedBy = "shared password of \(user)"
    case .renewal(let c): authenticatedBy = "certificate \(c.serialNumber)"
    }
    let fields: [(String, String)] = [
      ("time", Timestamp.iso8601(Date())), ("operation", operation), ("device", device),
      ("serial", certificate.serialNumber), ("subject", certificate.subject),
      ("notAfter", Timestamp.iso8601(certificate.notAfter)),
      ("fingerprint", certificate.fingerprint), ("keyFingerprint", Certificate.sha256Hex(certificate.publicKeyDER)),
      ("authenticatedBy", authenticatedBy),
      // "verified: TPM2_Certify by AK <serial>, key name <hex>", or "none".
      (
        "keyAttestation",
        attestation.map {
          "verified: TPM2_Certify by AK \($0.attestationKeyCertificate.serialNumber), key name \($0.keyName)"
        } ?? "none"
      ),
    ]
    let line = "{" + fields.map { "\"\($0.0)\":\(JSON.string($0.1))" }.joined(separator: ",") + "}\n"
    lock.lock()
    defer { lock.unlock() }
    try AppendOnlyFile.append(Array(line.utf8), to: path)
  }

  // MARK: - Encoding

  /// Base64 in lines of 64 characters, each ended by CRLF.
  static func base64Lines(_ der: [UInt8]) -> String { Base64.encodeLines(der, newline: "\r\n") }

  /// Base64 with any whitespace; nil for anything else.
  package static func decodeBase64(_ body: [UInt8]) -> [UInt8]? {
    let compact = body.filter { !($0 == 32 || $0 == 9 || $0 == 10 || $0 == 13) }
    return Base64.decode(String(decoding: compact, as: UTF8.self))
  }

  package static func basicCredentials(_ header: String?) -> (String, String)? {
    guard let header, header.lowercased().hasPrefix("basic "),
      let raw = Base64.decode(String(header.dropFirst(6)).trimmingCharacters(in: .whitespaces))
    else { return nil }
    let text = String(decoding: raw, as: UTF8.self)
    guard let colon = text.firstIndex(of: ":") else { return nil }
    return (String(text[..<colon]), String(text[text.index(after: colon)...]))
  }

  static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for i in 0..<a.count { difference |= a[i] ^ b[i] }
    return difference == 0
  }
}
