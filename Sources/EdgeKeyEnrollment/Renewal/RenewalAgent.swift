import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

/// Where and how the device enrolls.
public struct EnrollmentSettings: Sendable {
  /// The EST server (and label) to enroll with.
  public var server: ESTServer
  /// The anchors the device was given for the enrollment server's TLS certificate and for the
  /// chains it issues. Anchors learnt from `cacerts` are added to these.
  public var trustAnchors: [Certificate]
  /// Timeouts, waits, TLS versions and CRLs of the EST client.
  public var options: ESTOptions
  /// HTTP Basic credentials for first enrollment (a factory one-time secret), if any. Never logged.
  public var password: (user: String, password: String)?
  /// Bind each request to its TLS connection (tls-unique in the challengePassword, RFC 7030
  /// §3.5). TLS 1.2 only: set `options.maximumVersion = .tls12` too.
  public var channelBinding = false

  /// Settings for `server`, trusting `trustAnchors`.
  public init(
    server: ESTServer, trustAnchors: [Certificate], options: ESTOptions = ESTOptions(),
    password: (user: String, password: String)? = nil
  ) {
    self.server = server
    self.trustAnchors = trustAnchors
    self.options = options
    self.password = password
  }
}

/// When and how to renew.
public struct RenewalPolicy: Sendable {
  /// The end of the renewal window: renew by the time this share of the lifetime has passed.
  public var renewAfter = 0.75
  /// The width of the renewal window, as a share of the lifetime: each certificate renews at a
  /// point of [renewAfter − jitter, renewAfter] (by default 60 % to 75 %) drawn from its
  /// fingerprint, so a batch issued within seconds does not renew as one, and a device renews
  /// at the same point after a restart.
  public var jitter = 0.15
  /// The shortest wait after a failed attempt, whatever the situation: a fleet whose RA is down
  /// sends it at most one attempt per device per this long.
  public var minimumBackoff: Duration = .seconds(30)
  /// The bound on the first wait after a failure; doubled per consecutive failure up to
  /// `maximumBackoff`. The wait is drawn uniformly between `minimumBackoff` and the bound (full
  /// jitter), so failed devices do not come back as one.
  public var initialBackoff: Duration = .seconds(30)
  /// The longest wait between two failed attempts.
  public var maximumBackoff: Duration = .seconds(3600)
  /// Once the certificate has expired and the device can still enroll (a valid bootstrap
  /// credential or an enrollment password), the bound on every wait: a fleet whose RA was down
  /// past its certificates' expiry is valid again within this long of the RA's return. Before
  /// expiry the bound is a third of the remaining validity (several tries before it).
  public var expiredBackoff: Duration = .seconds(45)
  /// A new TPM key for each certificate (rotation). Off: the key is kept and only the
  /// certificate renewed.
  public var rotateKeys = true
  /// The key type of new keys.
  public var keyAlgorithm: KeyAlgorithm = .eccP256
  /// Activate an attestation key with the RA first when the device has none (`provision
  /// --attest`). Once the device has an AK certificate, every request carries TPM2_Certify
  /// evidence for its key whatever this says.
  public var attest = false
  /// A clock reading before this is wrong (the build is newer): nothing is renewed, rotated or
  /// discarded.
  public var earliestPlausibleDate = Date(timeIntervalSince1970: 1_793_491_200)  // 2026-11-01

  /// The defaults above.
  public init() {}

  /// The moment to renew a certificate.
  public func renewalDate(for certificate: Certificate) -> Date {
    let lifetime = certificate.notAfter.timeIntervalSince(certificate.notBefore)
    let seed = UInt32(certificate.fingerprint.prefix(8), radix: 16) ?? 0
    let early = Double(seed) / Double(UInt32.max) * jitter * lifetime
    return certificate.notBefore.addingTimeInterval(lifetime * renewAfter - early)
  }

  /// The wait after `failures` consecutive failures in the same situation, `remaining` before
  /// expiry (zero or less: expired), `canEnroll` when an expired device can still enroll with
  /// a bootstrap credential or password; `random` is uniform in [0, 1).
  public func backoff(failures: Int, remaining: Duration, canEnroll: Bool = true, random: Double) -> Duration {
    let exponential = min(initialBackoff * Double(1 << min(max(failures - 1, 0), 60)), maximumBackoff)
    let bound: Duration
    if remaining > .zero {
      bound = min(exponential, remaining / 3)
    } else if canEnroll {
      bound = min(exponential, expiredBackoff)
    } else {
      bound = exponential  // nothing it can do will work until someone acts: wait long
    }
    let floor = minimumBackoff
    return bound > floor ? floor + (bound - floor) * min(max(random, 0), 1) : floor
  }
}

/// Something the agent did, for logs and metrics. Holds no secret.
public enum RenewalEvent: Sendable, CustomStringConvertible {
  /// The next renewal of `certificate` is due at this moment.
  case scheduled(Date, certificate: TLSError.CertificateSummary)
  /// An attempt began: re-enrollment with the current certificate, or enrollment.
  case started(reenroll: Bool)
  /// A new key was made in the TPM for the request.
  case keyCreated(algorithm: KeyAlgorithm)
  /// A new certificate was stored and installed, with a new key or the old one.
  case renewed(TLSError.CertificateSummary, newKey: Bool)
  /// The current certificate could not be used (expired, refused): enrolling with the bootstrap
  /// credential or password instead.
  case bootstrapFallback(reason: String)
  /// `cacerts` named new anchors (added) and no longer names some (kept until the chain in use
  /// no longer needs them).
  case anchorsChanged(added: [String], withdrawn: [String])
  /// Withdrawn anchors were dropped from the store.
  case anchorsRemoved([String])
  /// The previous credential was removed after the new one worked (and its TPM key, when it
  /// was rotated).
  case previousRetired(keyRetired: Bool)
  /// An attempt failed; the next is in `retryIn` (nil: not scheduled).
  case failed(EnrollmentError, retryIn: Duration?)
  /// The clock reads before `RenewalPolicy.earliestPlausibleDate`: nothing was done.
  case clockRefused(String)
  /// A stored key the TPM can never load again (a cleared or replaced TPM): its credential is
  /// treated as lost and a new key is enrolled with the bootstrap credential or password.
  case credentialLost(slot: String, reason: String)
  /// What the server's csrattrs asked for: applied to the request, or reported as not applied.
  case serverAttributes(applied: [String], notApplied: [String])
  /// A step of attestation: the AK made or activated, or the new key certified by it.
  case attestation(String)

  public var description: String {
    switch self {
    case .scheduled(let date, let cert): return "renewal of \(cert.subject) scheduled at \(date)"
    case .started(let reenroll): return reenroll ? "re-enrollment started" : "enrollment started"
    case .keyCreated(let algorithm): return "new \(algorithm) key created in the TPM"
    case .renewed(let cert, let newKey):
      return "installed \(cert.subject) until \(cert.notAfter)\(newKey ? " with a new key" : "")"
    case .bootstrapFallback(let reason): return "falling back to the bootstrap credential: \(reason)"
    case .anchorsChanged(let added, let withdrawn):
      return "trust anchors: added \(added), no longer sent \(withdrawn)"
    case .anchorsRemoved(let removed): return "trust anchors removed: \(removed)"
    case .previousRetired(let keyRetired): return "previous credential retired\(keyRetired ? " with its key" : "")"
    case .failed(let error, let retry):
      return "renewal failed: \(error)\(retry.map { "; retry in \(Text.fixed($0.seconds)) s" } ?? "")"
    case .clockRefused(let why): return "clock refused: \(why)"
    case .credentialLost(let slot, let reason):
      return "the \(slot) credential's key can no longer be loaded by this TPM (cleared or replaced): \(reason)"
    case .attestation(let what): return what
    case .serverAttributes(let applied, let notApplied):
      return "the server's csrattrs: applied \(applied.isEmpty ? "nothing" : applied.joined(separator: ", "))"
        + (notApplied.isEmpty ? "" : "; not applied: \(notApplied.joined(separator: "; "))")
    }
  }
}

/// Counts per step, for `status` and metrics.
public struct RenewalCounters: Sendable, Equatable {
  /// Enrollments and renewals tried.
  public var attempts = 0
  /// Certificates installed.
  public var renewals = 0
  /// Attempts that failed.
  public var failures = 0
  /// Attempts that fell back to the bootstrap credential or password.
  public var bootstrapFallbacks = 0
  /// TPM keys made.
  public var keysCreated = 0
  /// Previous keys removed after the new credential worked.
  public var keysRetired = 0
  /// Trust anchors learnt from `cacerts`.
  public var anchorsAdded = 0
  /// Withdrawn trust anchors dropped.
  public var anchorsRemoved = 0
  /// Attempts refused because the clock was implausible.
  public var clockRefusals = 0
  /// Stored credentials found unusable because the TPM can never load their key again.
  public var credentialsLost = 0
  /// Requests sent with TPM2_Certify evidence for their key.
  public var attested = 0
}

/// Keeps the device's certificate valid: enrolls, renews at the policy's moment, rotates the
/// TPM key, follows the CA's anchors, and retires the old credential once the new one has
/// worked. Every switch goes through the `CredentialStore`, so a kill at any instant leaves a
/// working credential.
///
/// `install` is called with each new credential (give it to the MQTT client); call
/// `confirmInUse()` when a handshake with it has succeeded, which retires the previous key.
public final class RenewalAgent: @unchecked Sendable {
  /// Where the credentials are kept, crash-safe.
  public let store: CredentialStore
  /// The TPM that holds the keys.
  public let tpm: TPM
  /// Where and how to enroll.
  public let settings: EnrollmentSettings
  /// When to renew, and with what key.
  public let policy: RenewalPolicy
  /// The subject and names to request; nil: those of the current (or bootstrap) certificate.
  public let identity: (subject: [(String, String)], names: [SubjectAlternativeName])?

  private let onEvent: @Sendable (RenewalEvent) -> Void
  private let install: @Sendable (Credential, TPMKey) -> Void
  private let clock: @Sendable () -> Date
  private let condition = Condition()
  private var state = State()

  private struct State {
    var counters = RenewalCounters()
    var withdrawn: [Certificate] = []
    var running = false
    var stopping = false
    var kick = false
    var finished = false
    /// Ends the EST transfers and waits of an attempt under way when `stop()` is called.
    var cancellation = ESTCancellation()
    var lastError: EnrollmentError?
    /// CRLs fetched since the agent was made (`useRevocationLists`), instead of `settings`'.
    var crlPEM: String??
  }

  /// The CRLs (PEM) to check the EST server's chain with from the next renewal on: a
  /// `RevocationListCache` refreshed them.
  public func useRevocationLists(_ pem: String?) { locked { $0.crlPEM = .some(pem) } }

  /// An agent for the credentials in `store`, with keys in `tpm`. `onEvent` and `install` are
  /// called on the agent's thread; `clock` gives the wall-clock time certificates are judged by.
  public init(
    store: CredentialStore, tpm: TPM, settings: EnrollmentSettings, policy: RenewalPolicy = RenewalPolicy(),
    identity: (subject: [(String, String)], names: [SubjectAlternativeName])? = nil,
    clock: @escaping @Sendable () -> Date = { Date() },
    onEvent: @escaping @Sendable (RenewalEvent) -> Void = { _ in },
    install: @escaping @Sendable (Credential, TPMKey) -> Void = { _, _ in }
  ) {
    self.store = store
    self.tpm = tpm
    self.settings = settings
    self.policy = policy
    self.identity = identity
    self.clock = clock
    self.onEvent = onEvent
    self.install = install
  }

  /// What the agent did so far.
  public var counters: RenewalCounters { locked { $0.counters } }

  /// The last attempt's failure, nil after a success.
  public var lastError: EnrollmentError? { locked { $0.lastError } }

  /// The credential in use and its key, or nil before the first enrollment. Loading the key
  /// costs TPM commands (25–190 ms each on a real chip): they run on a thread of EdgeKey's own.
  public func current() async throws(EnrollmentError) -> (Credential, TPMKey)? {
    try await BlockingPool.shared.run { () throws(EnrollmentError) -> (Credential, TPMKey)? in try self.current() }
  }

  /// The credential in use and its key, as the async `current()` gives them, on the calling
  /// thread.
  public func current() throws(EnrollmentError) -> (Credential, TPMKey)? {
    guard let credential = try store.read(.current) else { return nil }
    return (credential, try load(credential.key))
  }

  /// True when the current certificate is valid now and its key still loads in this TPM:
  /// false before the first enrollment, after expiry, and after a TPM clear or replacement
  /// (then ``renew()`` enrolls a new key). Costs a key load (SRK + TPM2_Load) the first time.
  public func hasWorkingCredential() async throws(EnrollmentError) -> Bool {
    try await BlockingPool.shared.run { () throws(EnrollmentError) -> Bool in try self.hasWorkingCredential() }
  }

  /// Whether the current credential works, as the async overload tells, on the calling thread.
  public func hasWorkingCredential() throws(EnrollmentError) -> Bool {
    guard let current = try store.read(.current), let cert = current.certificate, cert.isValid(at: clock()) else {
      return false
    }
    return try usableKey(current.key, slot: .current) != nil
  }

  // MARK: - One attempt

  /// Enrolls or renews now: re-enrollment with the current certificate while it is valid;
  /// otherwise (first enrollment, or expired) enrollment with the bootstrap credential and/or
  /// the password. Returns the installed credential with its key, loaded.
  ///
  /// Async callers get this overload: the attempt runs on a thread of EdgeKey's own, and
  /// cancelling the calling task (or `stop()`) ends its EST transfer or 202 wait within about a
  /// second with `.cancelled`, nothing half-stored.
  @discardableResult
  public func renew() async throws(EnrollmentError) -> InstalledCredential {
    let cancellation = locked { $0.cancellation }.child()
    return try await BlockingPool.shared.run(onCancel: { cancellation.cancel() }) {
      () throws(EnrollmentError) -> InstalledCredential in try self.renew(cancellation: cancellation)
    }
  }

  /// Enrolls or renews now, as the async `renew()` does, on the calling thread; `stop()` cuts
  /// it short.
  @discardableResult
  public func renew() throws(EnrollmentError) -> InstalledCredential {
    try renew(cancellation: locked { $0.cancellation })
  }

  private func renew(cancellation: ESTCancellation) throws(EnrollmentError) -> InstalledCredential {
    locked { $0.counters.attempts += 1 }
    do {
      let credential: InstalledCredential
      do {
        credential = try attempt(cancellation: cancellation)
      } catch  where error.kind == .configuration && currentHasExpired() {
        // The current certificate was valid when the attempt chose it and expired before its
        // handshake (a renewal at the last moment, or a slow TPM): the same attempt again,
        // which now falls back to the bootstrap credential or password.
        credential = try attempt(cancellation: cancellation)
      }
      locked { $0.lastError = nil }
      return credential
    } catch {
      locked { s in
        s.counters.failures += 1
        s.lastError = error
        if error.kind == .clock { s.counters.clockRefusals += 1 }
      }
      throw error
    }
  }

  /// Whether the current certificate has expired by now (after an attempt that may have
  /// chosen it while it was still valid). Without one to fall back to, the second attempt fails
  /// where the first did, before any network traffic.
  private func currentHasExpired() -> Bool {
    guard let cert = (try? store.read(.current))??.certificate else { return false }
    return !cert.isValid(at: clock())
  }

  private func attempt(cancellation: ESTCancellation) throws(EnrollmentError) -> InstalledCredential {
    let now = clock()
    let current = try store.read(.current)
    let bootstrap = try store.read(.bootstrap)
    try checkClock(now, against: current?.certificate ?? bootstrap?.certificate)

    // Who we are to the server: the current certificate while it is valid and its key still
    // loads; else the bootstrap credential and/or the password.
    var authentication: ESTAuthentication
    let reenroll: Bool
    var lost: [String] = []
    let currentKey: TPMKey? =
      if let current, let cert = current.certificate, cert.isValid(at: now) {
        try usableKey(current.key, slot: .current)
      } else { nil }
    if let current, let currentKey {
      authentication = .certificate(current.chain, key: currentKey)
      // Some servers want HTTP authentication on re-enrollment too (RFC 7030 §3.2.3): the
      // password answers their challenge, and is not sent unasked.
      authentication.challengeCredentials = settings.password
      reenroll = true
    } else {
      if let current {
        let why =
          current.certificate?.isValid(at: now) == true
          ? "the current credential's key can no longer be loaded by this TPM"
          : "the current certificate expired at \(current.certificate?.notAfter ?? now)"
        if current.certificate?.isValid(at: now) == true { lost.append("current") }
        locked { $0.counters.bootstrapFallbacks += 1 }
        onEvent(.bootstrapFallback(reason: why))
      }
      let bootstrapKey: TPMKey? =
        if let bootstrap, let cert = bootstrap.certificate, cert.isValid(at: now) {
          try usableKey(bootstrap.key, slot: .bootstrap)
        } else { nil }
      if let bootstrap, bootstrapKey == nil, bootstrap.certificate?.isValid(at: now) == true {
        lost.append("bootstrap")
      }
      if let bootstrap, let bootstrapKey {
        authentication = .certificate(bootstrap.chain, key: bootstrapKey)
      } else if settings.password == nil {
        if !lost.isEmpty {
          throw EnrollmentError(
            .credentialLost,
            "this TPM can no longer load the device's \(lost.joined(separator: " and ")) key (the TPM was cleared, "
              + "or the state directory is on another TPM), and there is no enrollment password to enroll a new "
              + "key: provision the device again")
        }
        throw EnrollmentError(
          .configuration,
          current == nil
            ? "no bootstrap credential and no enrollment password: cannot enroll"
            : "the certificate expired and there is no valid bootstrap credential or password to enroll again")
      } else {
        authentication = .none
      }
      if let password = settings.password {
        authentication.username = password.user
        authentication.password = password.password
      }
      reenroll = false
    }
    onEvent(.started(reenroll: reenroll))

    // The CA's current anchors, before anything is requested.
    let stored = try store.anchors()
    var options = settings.options
    options.cancellation = cancellation
    if let crl = locked({ $0.crlPEM }) { options.crlPEM = crl }
    let client = try ESTClient(
      server: settings.server, trustAnchors: Self.union(settings.trustAnchors, stored), options: options)
    let rollover = AnchorRollover.merge(
      stored: stored, configured: settings.trustAnchors, offered: try client.caCertificates())
    if !rollover.added.isEmpty || rollover.withdrawn.map(\.der) != locked({ $0.withdrawn.map(\.der) }) {
      if !rollover.added.isEmpty { try store.saveAnchors(rollover.anchors) }
      locked { s in
        s.counters.anchorsAdded += stored.isEmpty ? 0 : rollover.added.count
        s.withdrawn = rollover.withdrawn
      }
      onEvent(.anchorsChanged(added: rollover.added.map(\.subject), withdrawn: rollover.withdrawn.map(\.subject)))
    }
    let issuing = try ESTClient(
      server: settings.server, trustAnchors: Self.union(settings.trustAnchors, rollover.anchors), options: options)

    // What the server wants in the request (RFC 7030 §4.5.2): optional, so a server that has no
    // csrattrs, or refuses it, leaves the request as policy makes it.
    let asked = try? issuing.requestedAttributes(authentication: reenroll ? authentication : .none)
    var applied: [String] = []
    var notApplied = asked?.notUnderstood.map { "\($0) (not understood)" } ?? []
    var algorithm = policy.keyAlgorithm
    if let wanted = asked?.keyAlgorithm {
      if !reenroll || policy.rotateKeys {
        algorithm = wanted
        applied.append("key \(wanted)")
      } else if (try? current?.key.publicKey().algorithm) ?? nil != wanted {
        notApplied.append("key \(wanted) (keys are not rotated: the current key is kept)")
      }
    }
    let (subject, names) = requestedIdentity(current: current, bootstrap: bootstrap)
    if let hash = asked?.signatureHash { applied.append("signed with \(hash.rawValue)") }
    if asked?.challengePassword == true {
      if settings.channelBinding {
        applied.append("challengePassword (tls-unique)")
      } else {
        notApplied.append("challengePassword (only a channel binding is sent there: enable it, TLS 1.2)")
      }
    }
    for oid in asked?.requestedExtensions ?? [] {
      if oid == "2.5.29.17" && names.isEmpty {
        notApplied.append("subjectAltName (no names to request)")
      } else {
        applied.append("extension \(oid)")
      }
    }
    if !applied.isEmpty || !notApplied.isEmpty { onEvent(.serverAttributes(applied: applied, notApplied: notApplied)) }

    // The key: the one already waiting in next.pem (a renewal cut short), a new one, or the
    // current one when rotation is off.
    let (keyFile, newKey) = try keyForRequest(current: reenroll ? current : nil, algorithm: algorithm)
    let key = try load(keyFile)
    // Attestation: the AK activated first when asked (provision --attest); then, whenever the
    // device has an AK certificate, TPM2_Certify of this key over a fresh nonce from the RA.
    if policy.attest {
      _ = try DeviceAttestation.activate(
        tpm: tpm, store: store, client: issuing, authentication: authentication, onEvent: { onEvent(.attestation($0)) })
    }
    var attestation: KeyAttestation? = nil
    if let (ak, chain) = try attestationKey() {
      attestation = try DeviceAttestation.evidence(
        for: key, by: ak, chain: chain, client: issuing, authentication: authentication)
    }
    if attestation != nil {
      onEvent(.attestation("the new key is certified by the attestation key (TPM2_Certify over the RA's nonce)"))
      locked { $0.counters.attested += 1 }
    } else if asked?.keyAttestation == true {
      onEvent(
        .serverAttributes(
          applied: [],
          notApplied: ["key attestation (this device has no activated attestation key: provision --attest)"]
        ))
    }
    func makeRequest(_ challenge: String?) throws(EnrollmentError) -> CertificateSigningRequest {
      do {
        return try CertificateSigningRequest(
          key: key, subject: subject, subjectAlternativeNames: names, challengePassword: challenge,
          signatureHash: asked?.signatureHash, attestation: attestation)
      } catch {
        throw EnrollmentError(error.layer == .tpm ? .tpm : .configuration, "the request: \(error.reason)", tls: error)
      }
    }
    let chain: [Certificate]
    if settings.channelBinding {
      chain = try issuing.enroll(
        bindingTo: { unique throws(EnrollmentError) in try makeRequest(unique) }, reenroll: reenroll,
        authentication: authentication)
    } else if reenroll {
      chain = try issuing.reenroll(try makeRequest(nil), authentication: authentication)
    } else {
      chain = try issuing.enroll(try makeRequest(nil), authentication: authentication)
    }

    // Saved, then switched to: each step atomic, and open() finishes a switch cut short.
    let issued = Credential(key: keyFile, chain: chain)
    try store.write(issued, to: .next)
    try store.promoteNext()
    locked { $0.counters.renewals += 1 }
    onEvent(.renewed(chain[0].summary, newKey: newKey))
    install(issued, key)
    return InstalledCredential(credential: issued, key: key)
  }

  /// The device's activated attestation key and its certificate chain; nil before activation.
  /// Opened for each request and flushed after its TPM2_Certify: held loaded between rotations
  /// it takes one of the TPM's few object slots (3 on swtpm), and the evictions that causes
  /// cost more commands than loading it once per rotation (measured: 18 against 15 per
  /// rotation on swtpm with the SRK persisted).
  private func attestationKey() throws(EnrollmentError) -> (AttestationKey, [Certificate])? {
    let chain = try store.attestationCertificates()
    guard !chain.isEmpty, let file = try store.attestationKey() else { return nil }
    do { return (try tpm.loadAttestationKey(file), chain) } catch {
      throw EnrollmentError(.tpm, "opening the attestation key: \(error)", tpm: error)
    }
  }

  private func keyForRequest(current: Credential?, algorithm: KeyAlgorithm) throws(EnrollmentError) -> (
    TSS2PrivateKey, Bool
  ) {
    if let current, !policy.rotateKeys { return (current.key, false) }
    if let pending = try? store.read(.next), !pending.isComplete,
      (try? pending.key.publicKey().algorithm) == algorithm
    {
      // A key created by an attempt that did not finish: used instead of making another, if
      // the TPM can still load it (a cleared TPM cannot).
      if let key = try? tpm.loadKey(pending.key), (try? key.load()) != nil { return (pending.key, true) }
      try store.remove(.next)
    }
    let file: TSS2PrivateKey
    do { file = try tpm.createKey(algorithm) } catch {
      throw EnrollmentError(.tpm, "creating the new \(algorithm) key: \(error)", tpm: error)
    }
    try store.write(Credential(key: file), to: .next)
    locked { $0.counters.keysCreated += 1 }
    onEvent(.keyCreated(algorithm: algorithm))
    return (file, true)
  }

  private func requestedIdentity(current: Credential?, bootstrap: Credential?) -> (
    [(String, String)], [SubjectAlternativeName]
  ) {
    if let identity { return (identity.subject, identity.names) }
    if let cert = current?.certificate ?? bootstrap?.certificate {
      return (cert.subjectFields, cert.subjectAlternativeNames)
    }
    return ([], [])
  }

  private func checkClock(_ now: Date, against certificate: Certificate?) throws(EnrollmentError) {
    var why: String?
    if now < policy.earliestPlausibleDate {
      why = "the clock reads \(now), before this software was built (\(policy.earliestPlausibleDate))"
    } else if let certificate, now.addingTimeInterval(settings.options.clockSkew.seconds) < certificate.notBefore {
      why = "the clock reads \(now), before our certificate was issued (\(certificate.notBefore))"
    }
    if let why {
      onEvent(.clockRefused(why))
      throw EnrollmentError(.clock, "\(why); nothing is renewed, rotated or discarded until it is set")
    }
  }

  // MARK: - After a successful handshake

  /// The current credential has been used in a successful handshake: the previous one (and its
  /// key) is retired, and anchors the server no longer sends are dropped when our chain does
  /// not need them.
  public func confirmInUse() async throws(EnrollmentError) {
    try await BlockingPool.shared.run { () throws(EnrollmentError) in try self.confirmInUse() }
  }

  /// Retires the previous credential, as the async `confirmInUse()` does, on the calling thread.
  public func confirmInUse() throws(EnrollmentError) {
    let hadPrevious = (try? store.read(.previous)) != nil
    let retiredKey = try store.retirePrevious()
    if retiredKey != nil { locked { $0.counters.keysRetired += 1 } }
    if hadPrevious { onEvent(.previousRetired(keyRetired: retiredKey != nil)) }

    let withdrawn = locked { $0.withdrawn }
    guard !withdrawn.isEmpty, let current = try store.read(.current), let leaf = current.certificate else { return }
    let stored = try store.anchors()
    let remaining = stored.filter { anchor in !withdrawn.contains { $0.der == anchor.der } }
    guard !remaining.isEmpty,
      (try? Certificate.verifiedChain(
        leaf: leaf, untrusted: Array(current.chain.dropFirst()), anchors: remaining, purpose: .clientAuth, at: clock()))
        != nil
    else { return }
    try store.saveAnchors(remaining)
    locked { s in
      s.counters.anchorsRemoved += stored.count - remaining.count
      s.withdrawn = []
    }
    onEvent(.anchorsRemoved(withdrawn.map(\.subject)))
  }

  // MARK: - Running in the background

  /// Renews in a thread of its own at the policy's moments until `stop()`.
  public func start() {
    let begin: Bool = locked { s in
      guard !s.running else { return false }
      s.running = true
      s.stopping = false
      s.finished = false
      // The thread holds the agent while it runs; the agent never holds the thread (that
      // cycle outlived stop() and leaked the agent, its store and the MQTT client it feeds).
      return true
    }
    if begin { Threads.detach(name: "edgekey-renewal") { [self] in run() } }
  }

  /// Asks for a renewal now (a SIGHUP, an operator's command, a broker that refused us).
  public func renewSoon() {
    condition.lock()
    state.kick = true
    condition.broadcast()
    condition.unlock()
  }

  /// Stops the background thread and waits for it: an attempt under way is cut short (its EST
  /// transfer or 202 wait ends within about a second, `.cancelled`, nothing half-stored).
  public func stop() async {
    await BlockingPool.shared.run { self.stop() }
  }

  /// Stops the background thread as the async `stop()` does, blocking the calling thread.
  public func stop() {
    condition.lock()
    guard state.running else {
      condition.unlock()
      return
    }
    state.stopping = true
    let cancellation = state.cancellation
    condition.broadcast()
    condition.unlock()
    cancellation.cancel()
    condition.lock()
    while !state.finished { condition.wait() }
    state.running = false
    state.cancellation = ESTCancellation()  // for a later start()
    condition.unlock()
  }

  private func run() {
    var failures = 0
    /// Whether the certificate had expired at the last failure: the count restarts when that
    /// changes, so an expiry during an outage does not inherit the long waits before it.
    var failedExpired: Bool?
    var checkedKey: String?
    while !locked({ $0.stopping }) {
      let now = clock()
      let current = try? store.read(.current)
      var wait: Duration
      if let cert = current?.certificate, !locked({ $0.kick }) {
        let due = policy.renewalDate(for: cert)
        // A key this TPM can no longer load (cleared, replaced) is a credential to replace now.
        let usable: Bool
        if cert.fingerprint == checkedKey {
          usable = true
        } else {
          do { usable = try usableKey(current!.key, slot: .current) != nil } catch { usable = true }
          if usable { checkedKey = cert.fingerprint }
        }
        if due > now && usable {
          if failures == 0 { onEvent(.scheduled(due, certificate: cert.summary)) }
          failures = 0
          failedExpired = nil
          sleep(until: due)
          continue
        }
      }
      locked { $0.kick = false }
      do {
        try renew()
        failures = 0
        failedExpired = nil
        continue
      } catch {
        if error.kind == .cancelled { break }
        let remaining = Duration.seconds(current?.certificate?.notAfter.timeIntervalSince(now) ?? 0)
        let expired = remaining <= .zero
        failures = failedExpired == expired ? failures + 1 : 1
        failedExpired = expired
        let bootstrapValid = (try? store.read(.bootstrap))??.certificate?.isValid(at: now) ?? false
        wait = policy.backoff(
          failures: failures, remaining: remaining, canEnroll: settings.password != nil || bootstrapValid,
          random: Double.random(in: 0..<1))
        // A server that said when to come back (Retry-After) is not asked sooner (RFC 7030 §4.2.3).
        if let asked = error.retryAfter { wait = max(wait, asked) }
        onEvent(.failed(error, retryIn: wait))
      }
      sleep(for: wait)
    }
    condition.lock()
    state.finished = true
    condition.broadcast()
    condition.unlock()
  }

  /// Waits `delay` on the monotonic clock (a back-off: an NTP step does not stretch it), or
  /// until stopped or kicked.
  private func sleep(for delay: Duration) {
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: max(delay, .zero))
    condition.lock()
    defer { condition.unlock() }
    while !state.stopping && !state.kick {
      let left = deadline - clock.now
      if left <= .zero { return }
      _ = condition.wait(seconds: left.seconds)
    }
  }

  /// Waits until the wall-clock moment `date` (a certificate's renewal date is one), or until
  /// stopped or kicked.
  private func sleep(until date: Date) {
    condition.lock()
    defer { condition.unlock() }
    while !state.stopping && !state.kick {
      let left = date.timeIntervalSince(clock())
      if left <= 0 { return }
      // Wake at least once a minute: a clock that jumped (NTP after boot) is noticed.
      condition.wait(seconds: min(left, 60))
    }
  }

  // MARK: - Helpers

  /// The stored key, loaded; nil when the TPM says it can never load it (counted and reported
  /// once per attempt). Other TPM failures (unreachable, busy, hung) are thrown: not a loss.
  private func usableKey(_ file: TSS2PrivateKey, slot: CredentialStore.Slot) throws(EnrollmentError) -> TPMKey? {
    let key = try load(file)
    do {
      try key.load()
      return key
    } catch  where error.meansKeyLost {
      locked { $0.counters.credentialsLost += 1 }
      onEvent(.credentialLost(slot: slot.rawValue, reason: error.reason))
      return nil
    } catch {
      throw EnrollmentError(.tpm, "loading the \(slot.rawValue) key: \(error)", tpm: error)
    }
  }

  private func load(_ file: TSS2PrivateKey) throws(EnrollmentError) -> TPMKey {
    do { return try tpm.loadKey(file) } catch {
      throw EnrollmentError(.tpm, "loading a stored key: \(error)", tpm: error)
    }
  }

  private static func union(_ a: [Certificate], _ b: [Certificate]) -> [Certificate] {
    var result = a
    for c in b where !result.contains(where: { $0.der == c.der }) { result.append(c) }
    return result
  }

  private func locked<R>(_ body: (inout State) -> R) -> R {
    condition.lock()
    defer { condition.unlock() }
    return body(&state)
  }
}
