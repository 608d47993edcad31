internal import CEdgeKeyHTTP
internal import CEdgeKeyProvider
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

/// One HTTP answer, as EST reads it.
struct HTTPAnswer {
  var status: Int
  var contentType: String
  var retryAfter: String
  var location: String
  var wwwAuthenticate: String = ""
  var body: [UInt8]
  var tlsVersion: Int32
}

/// Who we are to the server: a TLS client certificate whose key is in the TPM, HTTP Basic
/// credentials (sent over TLS only), or both.
public struct ESTAuthentication: Sendable {
  /// The client certificate chain (leaf first) for TLS client authentication; empty: none.
  public var certificateChain: [Certificate]
  /// The TPM key of the chain's leaf.
  public var key: TPMKey?
  /// HTTP Basic user, sent only over the verified TLS connection. Never logged.
  public var username: String?
  /// HTTP Basic password. Never logged.
  public var password: String?
  /// Credentials sent only when the server challenges for them (a 401 with
  /// `WWW-Authenticate: Basic`), e.g. on re-enrollment, where the certificate is enough for most
  /// servers and some want HTTP authentication too (RFC 7030 §3.2.3). Never logged.
  public var challengeCredentials: (user: String, password: String)?

  /// A certificate (with its TPM key), HTTP Basic credentials, both, or neither.
  public init(
    certificateChain: [Certificate] = [], key: TPMKey? = nil, username: String? = nil, password: String? = nil
  ) {
    self.certificateChain = certificateChain
    self.key = key
    self.username = username
    self.password = password
  }

  /// A client certificate (bootstrap, manufacturer or the current operational one).
  public static func certificate(_ chain: [Certificate], key: TPMKey) -> ESTAuthentication {
    ESTAuthentication(certificateChain: chain, key: key)
  }

  /// HTTP Basic over TLS.
  public static func password(user: String, password: String) -> ESTAuthentication {
    ESTAuthentication(username: user, password: password)
  }

  /// No authentication (cacerts).
  public static let none = ESTAuthentication()
}

/// libcurl through `edgekey_https`, with our TLS identity.
enum HTTPSTransport {
  struct Request {
    var method: String
    var url: String
    var contentType: String?
    var body: [UInt8]
    var authentication: ESTAuthentication
    /// nil: the server is not verified (the pinned bootstrap of `cacerts` only).
    var trustAnchorsPEM: String?
    var serverName: String
    var minimumVersion: TLSVersion
    var maximumVersion: TLSVersion
    var crlPEM: String? = nil
    var missingCRL: TLSPolicy.MissingCRL = .fail
    var allowNoEKU = false
    var timeout: Duration
    var connectTimeout: Duration
    var maximumResponseBytes: Int
    /// Channel binding: GET this URL first, then build the body from the connection's
    /// tls-unique and send it on the same connection.
    var binding: Binding? = nil
    var cancellation: ESTCancellation? = nil
  }

  struct Binding {
    var url: String
    var makeBody: ([UInt8]) throws(EnrollmentError) -> [UInt8]
  }

  /// Carries the Swift body builder through the C callback, and its error back.
  private final class BodyMaker {
    let make: ([UInt8]) throws(EnrollmentError) -> [UInt8]
    var error: EnrollmentError?
    init(_ make: @escaping ([UInt8]) throws(EnrollmentError) -> [UInt8]) { self.make = make }
  }

  static func perform(_ r: Request) throws(EnrollmentError) -> HTTPAnswer {
    let auth = r.authentication
    if auth.key != nil && auth.certificateChain.isEmpty {
      throw EnrollmentError(.configuration, "a TPM key for TLS client authentication needs its certificate")
    }
    let chainPEM = auth.certificateChain.isEmpty ? nil : auth.certificateChain.map(\.pem).joined()
    var response = edgekey_http_response()
    defer { edgekey_http_response_free(&response) }
    var config = edgekey_tls_config()
    config.key = auth.key?.raw
    // An EST server: serverAuth or id-kp-cmcRA (RFC 7030 §3.6.1); no EKU only when configured.
    TLSPolicy(
      trustAnchorsPEM: "", serverName: nil, missingCRL: r.missingCRL, minimumVersion: r.minimumVersion,
      maximumVersion: r.maximumVersion, requireServerAuth: !r.allowNoEKU, acceptCMCRA: true
    ).apply(to: &config)
    let maker = r.binding.map { BodyMaker($0.makeBody) }
    let makerPointer = maker.map { Unmanaged.passUnretained($0).toOpaque() }
    let outcome = withExtendedLifetime((maker, r.cancellation)) {
      withOptionalCString(r.crlPEM) { crl in
        withOptionalCString(r.binding?.url) { bindingURL in
          withOptionalCString(chainPEM) { chain in
            withOptionalCString(r.trustAnchorsPEM) { trust in
              r.serverName.withCString { name in
                withOptionalCString(r.contentType) { contentType in
                  withOptionalCString(auth.username) { user in
                    withOptionalCString(auth.password) { password in
                      r.method.withCString { method in
                        r.url.withCString { url in
                          r.body.withUnsafeBufferPointer { body in
                            config.chain_pem = chain
                            config.trust_pem = trust
                            config.server_name = name
                            config.crl_pem = crl
                            return withUnsafePointer(to: &config) { tls in
                              var request = edgekey_http_request()
                              request.method = method
                              request.url = url
                              request.content_type = contentType
                              request.body = body.baseAddress
                              request.body_len = body.count
                              request.username = user
                              request.password = password
                              request.tls = trust == nil ? nil : tls
                              request.timeout_ms = Int(r.timeout.seconds * 1000)
                              request.connect_timeout_ms = Int(r.connectTimeout.seconds * 1000)
                              request.max_response = r.maximumResponseBytes
                              if let cancellation = r.cancellation {
                                request.cancelled_arg = Unmanaged.passUnretained(cancellation).toOpaque()
                                request.cancelled = { arg in
                                  Unmanaged<ESTCancellation>.fromOpaque(arg!).takeUnretainedValue().isCancelled ? 1 : 0
                                }
                              }
                              if let makerPointer {
                                request.binding_url = bindingURL
                                request.make_body_arg = makerPointer
                                request.make_body = { arg, unique, length, bodyOut, bodyLength in
                                  let maker = Unmanaged<BodyMaker>.fromOpaque(arg!).takeUnretainedValue()
                                  do {
                                    let body = try maker.make(Array(UnsafeBufferPointer(start: unique, count: length)))
                                    let copy = malloc(max(body.count, 1))!.assumingMemoryBound(to: UInt8.self)
                                    body.withUnsafeBufferPointer { source in
                                      if let base = source.baseAddress { copy.update(from: base, count: source.count) }
                                    }
                                    bodyOut?.pointee = copy
                                    bodyLength?.pointee = body.count
                                    return 1
                                  } catch {
                                    maker.error =
                                      error as? EnrollmentError ?? EnrollmentError(.configuration, "\(error)")
                                    return 0
                                  }
                                }
                              }
                              return edgekey_https(&request, &response)
                            }
                          }
                        }
                      }
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
    let reason = withUnsafeBytes(of: &response.reason, text)
    switch outcome {
    case EDGEKEY_HTTP_OK:
      let body = response.body.map { Array(UnsafeBufferPointer(start: $0, count: response.body_len)) } ?? []
      return HTTPAnswer(
        status: response.status, contentType: withUnsafeBytes(of: &response.content_type, text),
        retryAfter: withUnsafeBytes(of: &response.retry_after, text),
        location: withUnsafeBytes(of: &response.location, text),
        wwwAuthenticate: withUnsafeBytes(of: &response.www_authenticate, text), body: body,
        tlsVersion: response.tls_version)
    case EDGEKEY_HTTP_TLS:
      let error = TLSError(failure: response.tls_failure)
      throw EnrollmentError(.tls, error.reason, tls: error, certificate: error.certificate)
    case EDGEKEY_HTTP_CONFIGURATION:
      let error = TLSError(
        status: response.tls_status, reason: reason, certificate: auth.certificateChain.first?.summary)
      throw EnrollmentError(.configuration, reason, tls: error, certificate: error.certificate)
    case EDGEKEY_HTTP_TIMEOUT: throw EnrollmentError(.timedOut, reason)
    case EDGEKEY_HTTP_TOO_LARGE: throw EnrollmentError(.responseTooLarge, reason)
    case EDGEKEY_HTTP_PROTOCOL: throw EnrollmentError(.malformedResponse, reason)
    case EDGEKEY_HTTP_NETWORK: throw EnrollmentError(.network, reason)
    case EDGEKEY_HTTP_ABANDONED: throw maker?.error ?? EnrollmentError(.configuration, reason)
    case EDGEKEY_HTTP_CANCELLED: throw EnrollmentError(.cancelled, "stopped during the transfer")
    default: throw EnrollmentError(.network, reason)
    }
  }

  static func text(_ raw: UnsafeRawBufferPointer) -> String {
    String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
  }
}

private func text(_ raw: UnsafeRawBufferPointer) -> String { HTTPSTransport.text(raw) }
