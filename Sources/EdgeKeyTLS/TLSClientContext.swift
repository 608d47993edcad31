import CEdgeKeyProvider
import COpenSSL
import EdgeKeyTPM

/// Whom we trust and how strictly, for the server side of mutual TLS.
public struct TLSPolicy: Sendable {
  /// The CA certificates the server's chain must end in (PEM). Not the system store.
  public var trustAnchorsPEM: String
  /// CRLs to check the server's chain against (PEM), if any.
  public var crlPEM: String?
  /// The host name or IP address the server's certificate must name.
  public var serverName: String?
  public var minimumVersion: TLSVersion
  public var maximumVersion: TLSVersion
  /// Require serverAuth in the server certificate's extended key usage (default: yes).
  public var requireServerAuth: Bool

  public init(
    trustAnchorsPEM: String, serverName: String?, crlPEM: String? = nil, minimumVersion: TLSVersion = .tls12,
    maximumVersion: TLSVersion = .tls13, requireServerAuth: Bool = true
  ) {
    self.trustAnchorsPEM = trustAnchorsPEM
    self.serverName = serverName
    self.crlPEM = crlPEM
    self.minimumVersion = minimumVersion
    self.maximumVersion = maximumVersion
    self.requireServerAuth = requireServerAuth
  }
}

public enum TLSVersion: Int32, Sendable, Comparable {
  case tls12 = 0x0303
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
  public let sslContext: OpaquePointer
  public let certificateChain: [Certificate]
  /// The TPM key (nil for a context made with a software key).
  public let key: TPMKey?
  public let policy: TLSPolicy

  public convenience init(certificateChain: [Certificate], key: TPMKey, policy: TLSPolicy) throws(TLSError) {
    try self.init(certificateChain: certificateChain, tpmKey: key, softwareKey: nil, policy: policy)
  }

  /// The same policy with a software key (an `EVP_PKEY *`, referenced, not taken): the floor a
  /// benchmark compares the TPM against, or a developer's stand-in. Devices use TPM keys.
  public convenience init(certificateChain: [Certificate], softwareKey: OpaquePointer, policy: TLSPolicy)
    throws(TLSError)
  {
    try self.init(certificateChain: certificateChain, tpmKey: nil, softwareKey: softwareKey, policy: policy)
  }

  private init(certificateChain: [Certificate], tpmKey key: TPMKey?, softwareKey: OpaquePointer?, policy: TLSPolicy)
    throws(TLSError)
  {
    guard let leaf = certificateChain.first else {
      throw TLSError(.configuration, .badCertificateChain, "no certificate")
    }
    let chainPEM = certificateChain.map(\.pem).joined()
    var status = EDGEKEY_TLS_OK
    var why = [CChar](repeating: 0, count: 512)
    var config = edgekey_tls_config()
    config.key = key?.raw
    config.software_key = softwareKey
    config.min_version = policy.minimumVersion.rawValue
    config.max_version = policy.maximumVersion.rawValue
    config.allow_missing_server_auth_eku = policy.requireServerAuth ? 0 : 1
    let context: OpaquePointer? = chainPEM.withCString { chain in
      policy.trustAnchorsPEM.withCString { trust in
        withOptionalCString(policy.crlPEM) { crl in
          withOptionalCString(policy.serverName) { name in
            config.chain_pem = chain
            config.trust_pem = trust
            config.crl_pem = crl
            config.server_name = name
            return edgekey_tls_client_ctx(&config, &status, &why, why.count)
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
}

package func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
  guard let s else { return body(nil) }
  return s.withCString { body($0) }
}
