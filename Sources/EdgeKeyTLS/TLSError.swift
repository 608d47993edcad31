package import CEdgeKeyProvider
package import COpenSSL

#if canImport(Glibc)
  import Glibc
#endif

/// A TLS failure, with the layer that failed and the certificate at fault.
///
/// The mTLS guide's first advice: when a handshake fails, say which layer failed and name the
/// certificate's subject, issuer and dates and the reason. `description` does exactly that.
public struct TLSError: Error, CustomStringConvertible, Sendable, Equatable {
  /// Where the failure happened.
  public enum Layer: String, Sendable, Equatable {
    /// Our own setup: certificate, key or trust anchors, found before any connection.
    case configuration
    /// Our certificate, refused locally before connecting (expired, wrong EKU, wrong key).
    case clientCertificate = "our certificate"
    /// The server's certificate did not pass our checks.
    case serverCertificate = "server certificate"
    /// The server refused our certificate (an alert during or right after the handshake).
    case rejectedByServer = "our certificate, refused by the server"
    /// No TLS version, cipher suite or signature algorithm in common.
    case `protocol`
    /// The TPM did not sign.
    case tpm = "TPM"
    /// Connection refused, reset, closed or timed out.
    case network
    /// Anything else libssl reported.
    case tls = "TLS"
  }

  /// What exactly, for code that reacts differently (backoff, fall back to bootstrap, ...).
  public enum Code: Sendable, Equatable {
    /// Our own chain is malformed or does not verify.
    case badCertificateChain
    /// Our certificate has expired.
    case certificateExpired
    /// Our certificate is not valid yet (or our clock is behind).
    case certificateNotYetValid
    /// Our certificate is not for clientAuth.
    case missingClientAuth
    /// Our certificate is not for our key.
    case certificateKeyMismatch
    /// No trust anchor was given, or none could be read.
    case noTrustAnchor
    /// A CRL we were given cannot be read.
    case badCRL
    /// No server name to verify was given.
    case noServerName
    /// The key cannot sign for TLS (its type, its TPM).
    case unusableKey
    /// The server's chain ends in a self-signed certificate we do not trust (unknown CA).
    case untrustedRoot
    /// An issuer in the server's chain was neither sent by the server nor trusted by us: a
    /// missing intermediate, or a chain from a CA we do not know.
    case issuerNotFound
    /// The server's certificate has expired (or our clock is ahead).
    case serverCertificateExpired
    /// The server's certificate is not valid yet (or our clock is behind).
    case serverCertificateNotYetValid
    /// The server's certificate does not name the host or IP address we connected to.
    case nameMismatch
    /// The server's certificate is not for serverAuth (extended key usage).
    case notForServerAuth
    /// The server's certificate is revoked by the CRL we were given.
    case revoked
    /// CRL checking was asked for but no valid CRL from the issuer is at hand.
    case crlUnavailable
    /// Any other verification failure, with its `X509_V_ERR_*` code.
    case serverVerification(Int)
    /// The server sent this TLS alert (e.g. 42 bad_certificate, 48 unknown_ca).
    case alert(Int)
    /// No TLS version or cipher suite in common.
    case protocolMismatch
    /// TLS 1.3: the connection ended right after we sent our certificate, with no alert and no
    /// session ticket. A reset, or a refusal whose alert was lost: transient, and worth
    /// treating as a refusal only when it keeps happening.
    case closedAfterOurCertificate
    /// The TPM did not sign the handshake (busy, reset, hung, the key gone).
    case tpmSigningFailed
    /// TCP: refused, unreachable, reset, or ended before TLS began.
    case connectionFailed
    /// The connection or handshake took too long.
    case timedOut
    /// Anything else, with libssl's reason.
    case other
  }

  /// A certificate's identity as the log should show it.
  public struct CertificateSummary: Sendable, Equatable, CustomStringConvertible {
    /// The subject, one line.
    public var subject: String
    /// The issuer, one line.
    public var issuer: String
    /// Valid from (ISO 8601).
    public var notBefore: String
    /// Valid until (ISO 8601).
    public var notAfter: String
    public var description: String {
      "subject \"\(subject)\", issuer \"\(issuer)\", valid \(notBefore) to \(notAfter)"
    }
  }

  /// Which layer failed.
  public var layer: Layer
  /// What exactly failed.
  public var code: Code
  /// What happened, for a log.
  public var reason: String
  /// The certificate at fault: the server's (at `depth`), or ours when the server refused it.
  public var certificate: CertificateSummary?
  /// Chain depth of the server certificate at fault (0 = the server's own).
  public var depth: Int?

  /// A failure of `layer` with `code`; `certificate` and `depth` say which certificate.
  public init(
    _ layer: Layer, _ code: Code, _ reason: String, certificate: CertificateSummary? = nil, depth: Int? = nil
  ) {
    self.layer = layer
    self.code = code
    self.reason = reason
    self.certificate = certificate
    self.depth = depth
  }

  /// Equal when the layer and the code are (the reason is for people, not for matching).
  public static func == (a: TLSError, b: TLSError) -> Bool { a.layer == b.layer && a.code == b.code }

  public var description: String {
    var text = "TLS failed (\(layer.rawValue)): \(reason)"
    if let certificate {
      text += depth.map { " [depth \($0)]" } ?? ""
      text += "; \(certificate)"
    }
    return text
  }
}

extension TLSError {
  /// X509_V_ERR_* values (x509_vfy.h).
  static func serverCode(_ error: Int) -> Code {
    switch error {
    case 18, 19: return .untrustedRoot  // DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN
    case 2, 20, 21: return .issuerNotFound  // UNABLE_TO_GET_ISSUER_CERT(_LOCALLY), UNABLE_TO_VERIFY_LEAF_SIGNATURE
    case 10: return .serverCertificateExpired
    case 9: return .serverCertificateNotYetValid
    case 62, 64: return .nameMismatch  // HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
    case 26: return .notForServerAuth  // INVALID_PURPOSE
    case 23: return .revoked
    case 3, 11, 12: return .crlUnavailable  // UNABLE_TO_GET_CRL, CRL_NOT_YET_VALID, CRL_HAS_EXPIRED
    default: return .serverVerification(error)
    }
  }

  /// A NUL-terminated C char array (imported as a tuple) as text.
  static func text(_ bytes: UnsafeRawBufferPointer) -> String {
    String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
  }

  /// From the C core's verdict on a failed connection.
  package init(failure f: edgekey_tls_failure) {
    var copy = f
    let reason = withUnsafeBytes(of: &copy.reason, TLSError.text)
    let subject = withUnsafeBytes(of: &copy.subject, TLSError.text)
    let issuer = withUnsafeBytes(of: &copy.issuer, TLSError.text)
    let notBefore = withUnsafeBytes(of: &copy.not_before, TLSError.text)
    let notAfter = withUnsafeBytes(of: &copy.not_after, TLSError.text)
    let summary =
      subject.isEmpty
      ? nil : CertificateSummary(subject: subject, issuer: issuer, notBefore: notBefore, notAfter: notAfter)
    switch f.layer {
    case EDGEKEY_LAYER_SERVER_CERTIFICATE:
      self.init(
        .serverCertificate, TLSError.serverCode(f.verify_error), reason, certificate: summary, depth: Int(f.depth))
    case EDGEKEY_LAYER_CLIENT_CERTIFICATE:
      self.init(.rejectedByServer, .alert(Int(f.alert)), reason, certificate: summary)
    case EDGEKEY_LAYER_PROTOCOL:
      self.init(.protocol, f.alert >= 0 ? .alert(Int(f.alert)) : .protocolMismatch, reason)
    case EDGEKEY_LAYER_TPM:
      self.init(.tpm, .tpmSigningFailed, reason)
    case EDGEKEY_LAYER_NETWORK:
      self.init(
        .network, f.ambiguous != 0 ? .closedAfterOurCertificate : .connectionFailed, reason, certificate: summary)
    default:
      self.init(.tls, f.alert >= 0 ? .alert(Int(f.alert)) : .other, reason)
    }
  }
}

extension TLSError {
  /// Why `edgekey_tls_client_ctx` or `edgekey_tls_configure` refused our setup.
  package init(status: edgekey_tls_status, reason: String, certificate summary: CertificateSummary?) {
    switch status {
    case EDGEKEY_TLS_CERT_EXPIRED: self.init(.clientCertificate, .certificateExpired, reason, certificate: summary)
    case EDGEKEY_TLS_CERT_NOT_YET_VALID:
      self.init(.clientCertificate, .certificateNotYetValid, reason, certificate: summary)
    case EDGEKEY_TLS_CERT_NO_CLIENT_AUTH:
      self.init(.clientCertificate, .missingClientAuth, reason, certificate: summary)
    case EDGEKEY_TLS_CERT_KEY_MISMATCH:
      self.init(.clientCertificate, .certificateKeyMismatch, reason, certificate: summary)
    case EDGEKEY_TLS_BAD_CHAIN: self.init(.configuration, .badCertificateChain, reason)
    case EDGEKEY_TLS_BAD_TRUST: self.init(.configuration, .noTrustAnchor, reason)
    case EDGEKEY_TLS_BAD_CRL: self.init(.configuration, .badCRL, reason)
    case EDGEKEY_TLS_NO_SERVER_NAME: self.init(.configuration, .noServerName, reason)
    case EDGEKEY_TLS_BAD_KEY: self.init(.configuration, .unusableKey, reason)
    default: self.init(.configuration, .other, reason)
    }
  }

  /// Explains a failed handshake or read on an SSL made from one of our contexts (the one
  /// libmosquitto or libcurl drives), from what the context recorded during the handshake.
  /// `sslError` is `SSL_get_error`'s value when known (`SSL_ERROR_SSL` otherwise).
  package static func diagnose(ssl: OpaquePointer?, sslError: Int32 = 1) -> TLSError {
    var failure = edgekey_tls_failure()
    edgekey_tls_diagnose(ssl, sslError, &failure)
    return TLSError(failure: failure)
  }

  /// The last connection from `context` that failed on a certificate, after its SSL is gone
  /// (libmosquitto 2.0 frees it before reporting a lost connection); nil when there is none
  /// since the last call.
  package static func lastFailure(of context: TLSClientContext) -> TLSError? {
    var failure = edgekey_tls_failure()
    guard edgekey_tls_last_failure(context.sslContext, &failure) != EDGEKEY_LAYER_NONE else { return nil }
    return TLSError(failure: failure)
  }

  /// True when retrying soon cannot help: a certificate refused by either side, or no protocol
  /// in common. The reconnect policy waits much longer after these.
  public var isRefusal: Bool {
    switch layer {
    case .serverCertificate, .rejectedByServer, .clientCertificate, .configuration, .protocol: return true
    case .tpm, .network, .tls: return false
    }
  }

  /// A short name of the reason, for counters.
  public var codeName: String {
    switch code {
    case .alert(let n): return "alert_\(n)"
    case .serverVerification(let n): return "verify_\(n)"
    default:
      let text = "\(code)"
      return text
    }
  }
}

/// How a connection from one of our contexts went at the TLS level, whether it failed or not:
/// for telling a server that accepted our certificate and then closed (a broker that does not
/// speak the MQTT version we sent) from one that refused it.
package struct TLSConnectionSummary: Sendable, Equatable {
  /// The handshake completed on our side.
  package var handshakeCompleted: Bool
  /// The server showed that it accepted our certificate: TLS 1.2 (its Finished follows its
  /// check of our certificate), or a TLS 1.3 session ticket.
  package var serverAcceptedUs: Bool
  /// The first alert the server sent, if any.
  package var alert: Int?
  /// The handshake resumed a kept session: no certificate was sent, nothing was signed.
  package var resumed: Bool

  init(_ info: edgekey_tls_connection_info) {
    handshakeCompleted = info.handshake_done != 0
    resumed = info.resumed != 0
    serverAcceptedUs = info.handshake_done != 0 && (info.version == 0x0303 || info.ticket_received != 0)
    alert = info.alert >= 0 ? Int(info.alert) : nil
  }

  /// What the live SSL recorded (libmosquitto still holds it).
  package static func of(ssl: OpaquePointer) -> TLSConnectionSummary? {
    var info = edgekey_tls_connection_info()
    guard edgekey_tls_connection_of(ssl, &info) == 1 else { return nil }
    return TLSConnectionSummary(info)
  }

  /// Whether `ssl` writes with MSG_NOSIGNAL (EdgeKey's socket BIO), so no write raises SIGPIPE.
  package static func writesWithoutSIGPIPE(ssl: OpaquePointer) -> Bool { edgekey_ssl_writes_nosignal(ssl) == 1 }

  /// The last connection of `context` whose SSL was freed, once (each call clears it).
  package static func last(of context: TLSClientContext) -> TLSConnectionSummary? {
    var info = edgekey_tls_connection_info()
    guard edgekey_tls_last_connection(context.sslContext, &info) == 1 else { return nil }
    return TLSConnectionSummary(info)
  }
}

/// Where a client TLS handshake driven by someone else (libmosquitto) stands.
package enum TLSHandshakeProgress: Sendable {
  /// Done (or no TLS).
  case finished
  /// Waiting for the server's answer: poll for reading.
  case waitingToRead
  /// Our next flight (the ClientHello first of all) waits for a writable socket: the TCP
  /// connect may still be pending.
  case waitingToWrite

  package static func of(ssl: OpaquePointer) -> TLSHandshakeProgress {
    if SSL_is_init_finished(ssl) == 1 { return .finished }
    // Until the ClientHello is on the wire (the TCP connect may still be pending), or while
    // OpenSSL waits to write, only a writable socket makes progress.
    if edgekey_tls_client_hello_sent(ssl) == 0 || SSL_want(ssl) == SSL_WRITING { return .waitingToWrite }
    return .waitingToRead
  }
}
