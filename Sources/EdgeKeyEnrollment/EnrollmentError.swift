import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

/// A failure of enrollment or renewal, with the step that failed.
public struct EnrollmentError: Error, CustomStringConvertible, Sendable, Equatable {
  /// Which step failed, for code that reacts differently (retry, fall back, stop).
  public enum Kind: Sendable, Equatable {
    /// The enrollment server could not be reached, or the connection broke.
    case network
    /// An exchange took longer than `ESTOptions.timeout`.
    case timedOut
    /// The TLS handshake failed; `tls` says which side and why.
    case tls
    /// The server answered with this HTTP status; `message` is its text.
    case server(Int)
    /// The server kept answering 202 beyond the time we wait.
    case pendingTooLong
    /// The answer was not what EST promises (content type, encoding, PKCS#7).
    case malformedResponse
    /// The answer was larger than `ESTOptions.maximumResponseBytes`.
    case responseTooLarge
    /// A redirect to another origin (scheme, host or port).
    case redirectRefused
    /// The issued certificate failed our checks and was not installed.
    case certificateRefused
    /// The CA certificates fetched for bootstrap did not include the pinned one.
    case pinMismatch
    /// Our own setup: URL, key, trust anchors.
    case configuration
    /// The TPM failed (key creation, signing the request).
    case tpm
    /// The credential store could not be read or written.
    case storage
    /// The clock is obviously wrong; nothing was renewed, rotated or discarded.
    case clock
    /// The TPM can no longer load the device's keys (cleared, or the state directory is on
    /// another TPM) and there is no bootstrap credential or password to enrol a new key:
    /// the device must be provisioned again.
    case credentialLost
    /// Stopped from outside (`RenewalAgent.stop()`, an `ESTCancellation`): nothing was issued.
    case cancelled
  }

  /// The step that failed.
  public var kind: Kind
  /// What happened, for a log: never holds a secret.
  public var message: String
  /// For `.tls`: the handshake failure with its layer and certificate.
  public var tls: TLSError?
  /// The certificate concerned (a refused issued certificate, our expired one).
  public var certificate: TLSError.CertificateSummary?
  /// For `.tpm`: the TPM's own error, whole (a busy TPM, to retry, is not a lockout, to stop).
  public var tpm: TPMError?
  /// For `.pendingTooLong` (and a 503 that said so): how long the server asked us to wait
  /// before asking again (Retry-After). RFC 7030 §4.2.3: the client MUST NOT ask sooner.
  public var retryAfter: Duration?

  /// A failure of `kind`, with what is known about it.
  public init(
    _ kind: Kind, _ message: String, tls: TLSError? = nil, certificate: TLSError.CertificateSummary? = nil,
    retryAfter: Duration? = nil, tpm: TPMError? = nil
  ) {
    self.kind = kind
    self.message = message
    self.tls = tls
    self.tpm = tpm
    self.certificate = certificate
    self.retryAfter = retryAfter
  }

  /// Worth retrying later with the same credentials (the server or the network may recover).
  public var isTransient: Bool {
    switch kind {
    case .network, .timedOut, .pendingTooLong, .responseTooLarge, .malformedResponse: return true
    case .server(let status): return status >= 500 || status == 408 || status == 429
    case .tls: return tls?.layer == .network || tls?.layer == .tls
    // A busy TPM, one out of object slots or one that timed out may answer next time; a
    // lockout, a lost key or a wrong argument will not.
    case .tpm:
      guard let code = tpm?.code else { return false }
      return code == .busy || code == .objectSlotsFull || code == .timeout
    default: return false
    }
  }

  /// Equal when the kinds are (the message is for people, not for matching).
  public static func == (a: EnrollmentError, b: EnrollmentError) -> Bool { a.kind == b.kind }

  public var description: String {
    var text: String
    switch kind {
    case .server(let status): text = "enrollment server answered \(status): \(message)"
    case .tls: text = "enrollment TLS: \(tls.map(String.init(describing:)) ?? message)"
    default: text = "enrollment \(kind): \(message)"
    }
    if let certificate, tls == nil { text += " [\(certificate)]" }
    return text
  }
}
