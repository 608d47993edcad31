package import CEdgeKeyProvider
package import COpenSSL
import EdgeKeyTPM

/// Whom we trust and how strictly, for the server side of mutual TLS.
public struct TLSPolicy: Sendable {
  /// The CA certificates the server's chain must end in (PEM). Not the system store.
  public var trustAnchorsPEM: String
  /// CRLs to check the server's chain against (PEM), if any. Every certificate of the chain is
  /// checked against its issuer's CRL, intermediates included.
  public var crlPEM: String?
  /// What a level of the server's chain whose issuer has no CRL here means (with `crlPEM`).
  public var missingCRL: MissingCRL
  /// The host name or IP address the server's certificate must name. A host name is also sent
  /// as SNI; an IP address never is (RFC 6066 §3).
  public var serverName: String?
  /// The oldest TLS version accepted.
  public var minimumVersion: TLSVersion
  /// The newest TLS version offered.
  public var maximumVersion: TLSVersion
  /// Require serverAuth in the server certificate's extended key usage (default: yes). False
  /// also accepts a certificate with no EKU at all (RFC 5280: unrestricted); an EKU that lists
  /// other purposes only is refused either way.
  public var requireServerAuth: Bool
  /// Accept id-kp-cmcRA in place of serverAuth: an EST server's certificate may carry it
  /// (RFC 7030 §3.6.1). Off for brokers.
  public var acceptCMCRA: Bool
  /// Application protocols offered by ALPN, in order of preference (RFC 7301), e.g.
  /// `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443. Empty: no ALPN extension.
  public var alpn: [String]
  /// Resume TLS sessions on reconnect (default: yes). The session tickets a server sends are
  /// kept in memory, in the context, per endpoint, never on disk; a reconnect to the same
  /// endpoint offers one (a TLS 1.3 ticket only once), and a resumed handshake sends no certificate, so
  /// it costs no TPM command. A new credential, trust anchor or CRL is a new context, whose
  /// cache starts empty: the first connection with it is a full handshake. A server that does
  /// not accept the ticket (it restarted with a new ticket key) completes a full handshake.
  public var resumesSessions: Bool
  /// A kept session is offered for at most this long after the server issued it (default 1
  /// hour; also at most the server's lifetime hint, and never past the expiry of either
  /// certificate), so the server's certificate is verified again at least this often.
  public var maximumSessionAge: Duration

  /// How to treat a chain level without a CRL.
  public enum MissingCRL: Sendable, Equatable {
    /// The handshake fails: "no CRL from this certificate's issuer" (the default: a CRL that
    /// is missing cannot say a certificate is revoked).
    case fail
    /// The level passes unchecked; levels with a CRL are still checked.
    case allow
  }

  /// The same, with the trust anchors as certificates (as `EnrollmentSettings` takes them).
  public init(
    trustAnchors: [Certificate], serverName: String?, crlPEM: String? = nil, missingCRL: MissingCRL = .fail,
    minimumVersion: TLSVersion = .tls12, maximumVersion: TLSVersion = .tls13
  ) {
    self.init(
      trustAnchorsPEM: trustAnchors.map(\.pem).joined(), serverName: serverName, crlPEM: crlPEM,
      missingCRL: missingCRL, minimumVersion: minimumVersion, maximumVersion: maximumVersion)
  }

  /// A policy trusting `trustAnchorsPEM` for a server named `serverName`.
  public init(
    trustAnchorsPEM: String, serverName: String?, crlPEM: String? = nil, missingCRL: MissingCRL = .fail,
    minimumVersion: TLSVersion = .tls12, maximumVersion: TLSVersion = .tls13, requireServerAuth: Bool = true,
    acceptCMCRA: Bool = false, alpn: [String] = [], resumesSessions: Bool = true,
    maximumSessionAge: Duration = .seconds(3600)
  ) {
    self.trustAnchorsPEM = trustAnchorsPEM
    self.serverName = serverName
    self.crlPEM = crlPEM
    self.missingCRL = missingCRL
    self.minimumVersion = minimumVersion
    self.maximumVersion = maximumVersion
    self.requireServerAuth = requireServerAuth
    self.acceptCMCRA = acceptCMCRA
    self.alpn = alpn
    self.resumesSessions = resumesSessions
    self.maximumSessionAge = maximumSessionAge
  }
}

/// A TLS version (its wire value).
public enum TLSVersion: Int32, Sendable, Comparable {
  /// TLS 1.2.
  case tls12 = 0x0303
  /// TLS 1.3.
  case tls13 = 0x0304
  public static func < (a: TLSVersion, b: TLSVersion) -> Bool { a.rawValue < b.rawValue }
}

/// A client `SSL_CTX` for mutual TLS with a TPM-held key: what libssl, libmosquitto
/// (`MOSQ_OPT_SSL_CTX`) and libcurl (`CURLOPT_SSL_CTX_FUNCTION`) are handed.
///
/// Built once and reused for every connection: the key is never reloaded per connect, and a
/// handshake costs one TPM command (TPM2_Sign). Our certificate is checked when the context is
/// made (dates, clientAuth, matches the key), so a bad identity fails here, before any
/// connection is tried. The `SSL_CTX` is freed on `deinit`.
public final class TLSClientContext: @unchecked Sendable {
  // @unchecked: an SSL_CTX is safe to share once configured; nothing here mutates it.
  /// The `SSL_CTX *`, borrowed for as long as this object lives.
  package let sslContext: OpaquePointer
  /// The client certificate chain presented, leaf first.
  public let certificateChain: [Certificate]
  /// The TPM key (nil for a context made with a software key).
  public let key: TPMKey?
  /// How the server is verified.
  public let policy: TLSPolicy

  /// A context presenting `certificateChain` (leaf first), signing its handshakes with `key` in
  /// the TPM; `.configuration` errors for an empty chain, unreadable anchors or a chain that does
  /// not suit the key.
  public convenience init(certificateChain: [Certificate], key: TPMKey, policy: TLSPolicy) throws(TLSError) {
    try self.init(certificateChain: certificateChain, tpmKey: key, softwareKey: nil, policy: policy)
  }

  /// The same policy with a software key (an `EVP_PKEY *`, referenced, not taken): the floor a
  /// benchmark compares the TPM against, or a developer's stand-in. Devices use TPM keys.
  package convenience init(certificateChain: [Certificate], softwareKey: OpaquePointer, policy: TLSPolicy)
    throws(TLSError)
  {
    try self.init(certificateChain: certificateChain, tpmKey: nil, softwareKey: softwareKey, policy: policy)
  }

  private init(certificateChain: [Certificate], tpmKey key: TPMKey?, softwareKey: OpaquePointer?, policy: TLSPolicy)
    throws(TLSError)
  {
    guard policy.maximumSessionAge > .zero || !policy.resumesSessions else {
      throw TLSError(.configuration, .other, "maximumSessionAge must be positive")
    }
    guard let leaf = certificateChain.first else {
      throw TLSError(.configuration, .badCertificateChain, "no certificate")
    }
    if let bad = policy.alpn.first(where: { $0.isEmpty || $0.utf8.count > 255 || $0.contains(",") }) {
      throw TLSError(
        .configuration, .other, "ALPN protocol \"\(bad)\": 1 to 255 bytes, no comma (RFC 7301 §3.1)")
    }
    let chainPEM = certificateChain.map(\.pem).joined()
    var status = EDGEKEY_TLS_OK
    var why = [CChar](repeating: 0, count: 512)
    var config = edgekey_tls_config()
    config.key = key?.raw
    config.software_key = softwareKey
    policy.apply(to: &config)
    let context: OpaquePointer? = chainPEM.withCString { chain in
      policy.trustAnchorsPEM.withCString { trust in
        withOptionalCString(policy.crlPEM) { crl in
          withOptionalCString(policy.serverName) { name in
            withOptionalCString(policy.alpnList) { alpn in
              config.chain_pem = chain
              config.trust_pem = trust
              config.crl_pem = crl
              config.server_name = name
              config.alpn = alpn
              return edgekey_tls_client_ctx(&config, &status, &why, why.count)
            }
          }
        }
      }
    }
    guard let context else {
      let reason = cString(why)
      throw TLSError(status: status, reason: reason, certificate: leaf.summary)
    }
    self.sslContext = context
    self.certificateChain = certificateChain
    self.key = key
    self.policy = policy
  }

  deinit { SSL_CTX_free(sslContext) }

  /// How many resumable sessions the context keeps, for all endpoints.
  public var keptSessions: Int { Int(edgekey_tls_kept_sessions(sslContext)) }

  /// Drops every kept session: the next connection to each endpoint is a full handshake.
  /// Returns how many there were.
  @discardableResult
  public func forgetSessions() -> Int { Int(edgekey_tls_forget_sessions(sslContext)) }

  /// Runs `body` with `endpoint` as the calling thread's endpoint for this context: an SSL
  /// that another library makes from it and starts inside `body` (libmosquitto's) keeps and
  /// offers that endpoint's sessions.
  package func withEndpoint<R>(_ endpoint: String, _ body: () throws -> R) rethrows -> R {
    edgekey_tls_endpoint_scope_enter(sslContext, endpoint)
    defer { edgekey_tls_endpoint_scope_leave() }
    return try body()
  }
}

extension TLSPolicy {
  /// The policy's switches in the C core's terms (the strings are set by the caller).
  package func apply(to config: inout edgekey_tls_config) {
    config.min_version = minimumVersion.rawValue
    config.max_version = maximumVersion.rawValue
    config.allow_missing_server_auth_eku = requireServerAuth ? 0 : 1
    config.accept_cmc_ra = acceptCMCRA ? 1 : 0
    config.crl_missing_ok = missingCRL == .allow ? 1 : 0
    config.resume_sessions = resumesSessions ? 1 : 0
    config.session_max_age_ms = max(Int(maximumSessionAge.milliseconds), 1)
  }

  /// The ALPN list as the C core takes it ("a,b"), nil when empty.
  package var alpnList: String? { alpn.isEmpty ? nil : alpn.joined(separator: ",") }
}

package func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
  guard let s else { return body(nil) }
  return s.withCString { body($0) }
}
