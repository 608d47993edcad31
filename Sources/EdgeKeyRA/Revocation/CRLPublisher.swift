import EdgeKeyCore
import Foundation

/// Keeps the CA's CRL current: a new one as soon as the registry records a revocation (an
/// `edgekey-ra admin revoke` in another process included) and before half of the current one's
/// validity has passed; each written atomically to a file a broker reads (`crlfile`).
public final class CRLPublisher: @unchecked Sendable {
  // @unchecked: `latest`, `version` and `stopped` are guarded by `condition`.
  /// The CA that signs the CRLs.
  public let ca: CertificateAuthority
  /// Where the revocations are recorded.
  public let registry: DeviceRegistry
  /// How long each CRL is valid (its nextUpdate); devices refresh before it passes.
  public let validity: Duration
  /// Where the PEM CRL is written (0644), or nil.
  public let path: String?
  private let logger: Logger
  private let condition = Condition()
  private var latest: RevocationList?
  private var version: Int64 = -1
  private var stopped = false
  private var running = false

  /// A publisher of `ca`'s CRL from `registry`, written to `path` when given.
  public init(
    ca: CertificateAuthority, registry: DeviceRegistry, validity: Duration = .seconds(86400), path: String? = nil,
    logger: Logger = .disabled
  ) {
    self.ca = ca
    self.registry = registry
    self.validity = validity
    self.path = path
    self.logger = logger
  }

  /// The current CRL, made anew first if a revocation was recorded since the last one or it
  /// is past half its validity. Costs a registry read; a signature when it is remade.
  public func current() throws(RAError) -> RevocationList {
    condition.lock()
    defer { condition.unlock() }
    return try refreshLocked()
  }

  private func refreshLocked() throws(RAError) -> RevocationList {
    let now = Date()
    let seen: Int64
    do { seen = try registry.revocationVersion() } catch { throw RAError("the registry: \(error)") }
    if let latest, seen == version, now < latest.thisUpdate.addingTimeInterval(validity.seconds / 2) { return latest }
    let list: RevocationList
    do {
      list = try ca.revocationList(
        try registry.revokedCertificates(at: now), number: try registry.nextCRLNumber(), validity: validity)
    } catch let error as RAError {
      throw error
    } catch {
      throw RAError("the registry: \(error)")
    }
    if let path {
      do { try AtomicFile.write(Array(list.pem.utf8), to: path, mode: 0o644) } catch {
        throw RAError("cannot write the CRL: \(error)")
      }
    }
    logger.info(
      "CRL \(list.number): \(list.serials.count) revoked certificate(s), next update \(Timestamp.iso8601(list.nextUpdate))"
    )
    latest = list
    version = seen
    return list
  }

  /// Checks every `interval` on a thread of its own, until `stop()`.
  public func start(interval: Duration = .seconds(1)) {
    condition.lock()
    guard !running else {
      condition.unlock()
      return
    }
    running = true
    condition.unlock()
    Threads.detach(name: "edgekey-ra-crl") { [self] in
      condition.lock()
      defer {
        running = false
        condition.broadcast()
        condition.unlock()
      }
      while !stopped {
        do { _ = try refreshLocked() } catch { logger.error("\(error)") }
        condition.wait(seconds: interval.seconds)
      }
    }
  }

  /// Stops the thread `start` began and waits for it.
  public func stop() {
    condition.lock()
    stopped = true
    condition.broadcast()
    while running { condition.wait() }
    condition.unlock()
  }
}
