import EdgeKeyCore
import EdgeKeyTLS
import FoundationEssentials

/// A CA's CRL fetched over HTTPS (the RA's `/crl`, or a mirror), kept in a file, and fetched
/// again before it goes stale: at half of its validity, as the RA makes new ones. What it
/// holds is always signed by one of the trusted CAs and current; a fetch that fails while the
/// held CRL is still current keeps it.
///
/// For the EST server's chain (`ESTOptions.crlPEM`) and the broker's (`TLSPolicy.crlPEM`).
public final class RevocationListCache: @unchecked Sendable {
  // @unchecked: `held`, `fetches` and `lastError` are guarded by `lock`.
  /// Where the CRL is fetched from (HTTPS).
  public let url: String
  /// Where the CRL is kept between runs (PEM), or nil.
  public let cachePath: String?
  private let signers: [Certificate]
  private let options: ESTOptions
  private let server: ESTServer
  private let lock = Lock()
  private var held: CertificateRevocationList?
  private var fetchCount = 0
  private var failure: EnrollmentError?

  /// - Parameters:
  ///   - url: an https URL answering the CRL, DER or PEM.
  ///   - trustAnchors: verify the server's certificate, and sign the CRL (one of them, or
  ///     `issuers`).
  ///   - options: timeouts, TLS versions; `maximumResponseBytes` bounds the CRL (default 1 MiB).
  public init(
    url: String, trustAnchors: [Certificate], issuers: [Certificate] = [], cachePath: String? = nil,
    options: ESTOptions = RevocationListCache.defaultOptions
  ) throws(EnrollmentError) {
    self.url = url
    server = try ESTServer(url: url)
    self.cachePath = cachePath
    signers = trustAnchors + issuers
    self.options = options
    // A cached CRL is used only if it still verifies; a damaged file is fetched again.
    if let cachePath, let bytes = try? AtomicFile.read(cachePath),
      let crl = try? CertificateRevocationList(bytes: bytes), crl.signer(among: signers) != nil
    {
      held = crl
    }
  }

  /// Options for fetching a CRL: the EST client's defaults, with answers up to 1 MiB.
  public static var defaultOptions: ESTOptions {
    var options = ESTOptions()
    options.maximumResponseBytes = 1 << 20
    return options
  }

  /// Fetches made so far.
  public var fetches: Int { lock.withLock { fetchCount } }
  /// Why the last fetch failed (nil after a good one).
  public var lastError: EnrollmentError? { lock.withLock { failure } }

  /// When the held CRL should be fetched again: half of its validity, or now if none is held.
  public var refreshDate: Date {
    lock.withLock {
      guard let held, let next = held.nextUpdate else { return held == nil ? Date.distantPast : Date.distantFuture }
      return held.thisUpdate.addingTimeInterval(next.timeIntervalSince(held.thisUpdate) / 2)
    }
  }

  /// The CRL to check with now: the held one while it is fresh, else a new one fetched (costs a
  /// TLS connection). Throws only when no current CRL can be had.
  public func current(now: Date = Date(), force: Bool = false) throws(EnrollmentError) -> CertificateRevocationList {
    if !force, now < refreshDate, let held = lock.withLock({ held }), held.isCurrent(at: now) { return held }
    do {
      let fresh = try fetch(now: now)
      lock.withLock {
        held = fresh
        failure = nil
      }
      return fresh
    } catch {
      lock.withLock { failure = error }
      if let held = lock.withLock({ held }), held.isCurrent(at: now) {
        options.logger.warning(
          "the CRL from \(url) could not be fetched (\(error)); the one held is current until \(held.nextUpdate.map(Timestamp.iso8601) ?? "-")"
        )
        return held
      }
      throw error
    }
  }

  private func fetch(now: Date) throws(EnrollmentError) -> CertificateRevocationList {
    lock.withLock { fetchCount += 1 }
    let answer = try HTTPSTransport.perform(
      HTTPSTransport.Request(
        method: "GET", url: url, contentType: nil, body: [], authentication: .none,
        trustAnchorsPEM: signers.map(\.pem).joined(), serverName: server.serverName,
        minimumVersion: options.minimumVersion, maximumVersion: options.maximumVersion,
        allowNoEKU: options.allowServerCertificateWithoutEKU, timeout: options.timeout,
        connectTimeout: options.connectTimeout, maximumResponseBytes: options.maximumResponseBytes,
        cancellation: options.cancellation))
    guard answer.status == 200 else {
      throw EnrollmentError(.server(answer.status), "the CRL at \(url): \(ESTBody.message(answer.body))")
    }
    let crl: CertificateRevocationList
    do { crl = try CertificateRevocationList(bytes: answer.body) } catch {
      throw EnrollmentError(.malformedResponse, "the CRL at \(url): \(error.reason)")
    }
    guard crl.signer(among: signers) != nil else {
      throw EnrollmentError(
        .malformedResponse, "the CRL at \(url) (issuer \(crl.issuer)) is not signed by a CA we trust")
    }
    guard crl.isCurrent(at: now) else {
      throw EnrollmentError(
        .malformedResponse,
        "the CRL at \(url) is not current (this update \(Timestamp.iso8601(crl.thisUpdate)), next update \(crl.nextUpdate.map(Timestamp.iso8601) ?? "-"))"
      )
    }
    if let held = lock.withLock({ held }), held.issuer == crl.issuer, let old = held.number, let new = crl.number,
      new < old
    {
      throw EnrollmentError(.malformedResponse, "the CRL at \(url) is older (number \(new)) than the one held (\(old))")
    }
    if let cachePath {
      do { try AtomicFile.write(Array(crl.pem.utf8), to: cachePath, mode: 0o644) } catch {
        throw EnrollmentError(.storage, "cannot keep the CRL: \(error)")
      }
    }
    return crl
  }
}
