import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM

/// The one error a ``Device`` throws, whatever failed underneath: an extensible ``Code`` to
/// match, the ``Layer`` the evidence points at, a sentence, and the underlying error kept whole
/// (`underlying as? TPMError` still tells a busy TPM from a lockout). Equal when the codes are.
public struct EdgeKeyError: Error, Sendable, Equatable, CustomStringConvertible {
  /// What went wrong, matched in `catch` clauses (`catch let e where e.code == .tpmBusy`).
  public struct Code: Hashable, Sendable, CustomStringConvertible {
    /// The code's name, as printed.
    public var name: String
    /// A code of your own (the set is open).
    public init(_ name: String) { self.name = name }
    public var description: String { name }

    /// No TPM answered.
    public static let tpmUnreachable = Code("tpmUnreachable")
    /// The TPM is busy (self test, yielded) or ran out of object slots: try again.
    public static let tpmBusy = Code("tpmBusy")
    /// The TPM did not answer in time; the context was reset.
    public static let tpmTimeout = Code("tpmTimeout")
    /// Dictionary-attack lockout: retrying makes it worse.
    public static let tpmLockout = Code("tpmLockout")
    /// The TPM can never load the device's key again (cleared, replaced).
    public static let keyLost = Code("keyLost")
    /// Any other TPM failure.
    public static let tpm = Code("tpm")
    /// The TLS handshake failed for a network reason (reset, EOF, timeout).
    public static let tlsNetwork = Code("tlsNetwork")
    /// The peer's certificate, or ours, was refused.
    public static let certificateRefused = Code("certificateRefused")
    /// The TLS handshake failed otherwise (protocol, configuration).
    public static let tls = Code("tls")
    /// The broker refused the connection (CONNACK code).
    public static let brokerRefused = Code("brokerRefused")
    /// The broker could not be reached, or the connection was lost.
    public static let brokerUnreachable = Code("brokerUnreachable")
    /// The outbox refused the message (full, disk full).
    public static let outboxFull = Code("outboxFull")
    /// An MQTT failure not named above (a rejected operation, a QoS 0 message while offline).
    public static let mqtt = Code("mqtt")
    /// The enrollment server refused us (a 4xx: policy, credentials); retrying as is will not help.
    public static let enrollmentRefused = Code("enrollmentRefused")
    /// The enrollment server could not be reached, or answered 5xx, 202 too long, or garbage.
    public static let enrollmentUnavailable = Code("enrollmentUnavailable")
    /// The device has no credential and nothing to enrol a new one with: provision it again.
    public static let credentialLost = Code("credentialLost")
    /// The clock is obviously wrong.
    public static let clock = Code("clock")
    /// The state directory or the outbox could not be read or written.
    public static let storage = Code("storage")
    /// Our own setup (a URL, a file, an option).
    public static let configuration = Code("configuration")
    /// The caller cancelled (task cancellation, `stop()`).
    public static let cancelled = Code("cancelled")
  }

  /// Where the evidence says the failure is.
  public enum Layer: String, Sendable, CustomStringConvertible {
    /// The TPM (or the TSS talking to it).
    case tpm
    /// A TLS handshake: certificates, protocol, the network under it.
    case tls
    /// The MQTT broker, the connection to it, or the outbox.
    case mqtt
    /// The enrollment server (EST): its answers and policy.
    case enrollment
    /// The state directory on disk.
    case storage
    /// Our own setup: configuration, files, options.
    case configuration
    /// The caller: a cancellation, a call made out of order.
    case caller
    public var description: String { rawValue }
  }

  /// What went wrong.
  public var code: Code
  /// Where the evidence says it went wrong.
  public var layer: Layer
  /// A sentence for people: what failed and, where known, what to do.
  public var reason: String
  /// The error as the layer below threw it (`TPMError`, `TLSError`, `MQTTError`,
  /// `EnrollmentError`, ...).
  public var underlying: (any Error & Sendable)?

  /// An error of the family, made directly.
  public init(_ code: Code, layer: Layer, reason: String, underlying: (any Error & Sendable)? = nil) {
    self.code = code
    self.layer = layer
    self.reason = reason
    self.underlying = underlying
  }

  /// Whether the same call may succeed later without anyone changing anything.
  public var isTransient: Bool {
    switch code {
    case .tpmBusy, .tpmTimeout, .tlsNetwork, .brokerUnreachable, .enrollmentUnavailable, .outboxFull: true
    default: false
    }
  }

  public static func == (a: EdgeKeyError, b: EdgeKeyError) -> Bool { a.code == b.code }

  public var description: String { "\(layer) [\(code)]: \(reason)" }

  /// The family's view of an error from any EdgeKey module.
  public init(_ error: any Error, context: String? = nil) {
    func with(_ reason: String) -> String { context.map { "\($0): \(reason)" } ?? reason }
    switch error {
    case let e as EdgeKeyError:
      self = e
      if let context { reason = "\(context): \(e.reason)" }
    case let e as TPMError:
      let code: Code
      switch e.code {
      case .unreachable: code = .tpmUnreachable
      case .busy, .objectSlotsFull: code = .tpmBusy
      case .timeout: code = .tpmTimeout
      case .lockout: code = .tpmLockout
      case .invalidArgument, .invalidKeyFile, .authRequired: code = e.meansKeyLost ? .keyLost : .configuration
      default: code = e.meansKeyLost ? .keyLost : .tpm
      }
      self.init(code, layer: .tpm, reason: with(e.description), underlying: e)
    case let e as TLSError:
      self.init(Self.code(e), layer: e.layer == .tpm ? .tpm : .tls, reason: with(e.description), underlying: e)
    case let e as MQTTError:
      let code: Code
      switch e.kind {
      case .connectionRefused: code = .brokerRefused
      case .connectionFailed, .timedOut, .protocolVersionUnsupported: code = .brokerUnreachable
      case .outboxFull, .diskFull: code = .outboxFull
      case .outbox: code = .storage
      case .stopped: code = .cancelled
      case .invalidArgument: code = .configuration
      default: code = .mqtt
      }
      self.init(code, layer: code == .cancelled ? .caller : .mqtt, reason: with(e.reason), underlying: e)
    case let e as EnrollmentError:
      // The TPM's own error is kept whole where the enrollment step had it.
      if let tpm = e.tpm {
        self.init(tpm, context: context)
        reason = with(e.description)
        return
      }
      if let tls = e.tls, e.kind == .tls || e.kind == .tpm {
        self.init(tls, context: context)
        underlying = e
        return
      }
      let code: Code
      let layer: Layer
      switch e.kind {
      case .network, .timedOut, .pendingTooLong, .malformedResponse, .responseTooLarge:
        (code, layer) = (.enrollmentUnavailable, .enrollment)
      case .server(let status):
        (code, layer) = (
          status >= 500 || status == 408 || status == 429 ? .enrollmentUnavailable : .enrollmentRefused, .enrollment
        )
      case .tls: (code, layer) = (.tls, .tls)
      case .redirectRefused, .certificateRefused, .pinMismatch: (code, layer) = (.certificateRefused, .enrollment)
      case .configuration: (code, layer) = (.configuration, .configuration)
      case .tpm: (code, layer) = (.tpm, .tpm)
      case .storage: (code, layer) = (.storage, .storage)
      case .clock: (code, layer) = (.clock, .configuration)
      case .credentialLost: (code, layer) = (.credentialLost, .tpm)
      case .cancelled: (code, layer) = (.cancelled, .caller)
      }
      self.init(code, layer: layer, reason: with(e.description), underlying: e)
    case is CancellationError:
      self.init(.cancelled, layer: .caller, reason: with("cancelled"))
    default:
      self.init(
        .configuration, layer: .configuration, reason: with("\(error)"), underlying: error as? any Error & Sendable)
    }
  }

  private static func code(_ e: TLSError) -> Code {
    switch e.layer {
    case .network: .tlsNetwork
    case .serverCertificate, .clientCertificate, .rejectedByServer: .certificateRefused
    case .tpm: .tpm
    default: .tls
    }
  }
}
