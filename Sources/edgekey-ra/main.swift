// edgekey-ra: the registration authority (EST server, RFC 7030) for the factory line and tests.
import CEdgeKeyProvider
import EdgeKeyCore
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

let usage = """
  usage: edgekey-ra --tls-cert PEM --tls-key PEM --ca-cert PEM (--ca-key PEM | --ca-key-tpm KEYFILE) [options]

  An EST server (RFC 7030): /.well-known/est[/LABEL]/{cacerts,csrattrs,simpleenroll,simplereenroll}.

    --listen HOST:PORT     where to listen (default 127.0.0.1:8443; port 0 picks a free one)
    --tls-cert PEM         the server's certificate chain (serverAuth)
    --tls-key PEM          the server's private key
    --ca-cert PEM          the issuing CA's certificate, then any CA above it
    --ca-key PEM           the issuing CA's private key, in a file
    --ca-key-tpm KEYFILE   or held in this station's TPM (a TSS2 PRIVATE KEY file; --tcti T)
    --tcti T               the TPM for --ca-key-tpm (default: $EDGEKEY_TCTI, then /dev/tpmrm0)
    --cacerts PEM          what cacerts returns (default: the CA chain); for CA rollover
    --bootstrap-ca PEM     client certificates from this CA may enroll (repeatable)
    --password USER:PASS   HTTP Basic credentials that may enroll (or EDGEKEY_RA_PASSWORD)
    --lifetime DURATION    certificate lifetime: 90s, 15m, 12h, 30d (default 30d)
    --backdate SECONDS     notBefore this far before now (default 60)
    --pending N            answer 202 N times per key before issuing (default 0)
    --retry-after SECONDS  the Retry-After of a 202 (default 1)
    --channel-binding      require tls-unique in the challengePassword on TLS 1.2
    --label LABEL          also answer under /.well-known/est/LABEL/
    --tls-max 1.2|1.3      highest TLS version (default 1.3)
    --max-body BYTES       largest request body (default 65536)
    --log PATH             append-only issuance log (JSON lines, fsync'd)
    --csrattrs FILE        what csrattrs answers (DER, or its base64); default: challengePassword,
                           an EC P-256 key, ECDSA with SHA-256
    --reenroll-password USER:PASS
                           re-enrollment also needs these HTTP Basic credentials (RFC 7030 3.2.3);
                           a request without them gets 401 with a Basic challenge

  Prints "listening on https://HOST:PORT" when ready; stops on SIGTERM or SIGINT.
  """

func fail(_ message: String) -> Never {
  FileHandle.standardError.write(Data("edgekey-ra: \(message)\n".utf8))
  exit(2)
}

func readText(_ path: String) -> String {
  do { return String(decoding: try AtomicFile.read(path), as: UTF8.self) } catch { fail("\(error)") }
}

func duration(_ text: String) -> TimeInterval {
  let units: [Character: TimeInterval] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
  if let unit = text.last, let scale = units[unit], let value = Double(text.dropLast()) { return value * scale }
  if let value = Double(text) { return value }
  fail("\(text) is not a duration (90s, 15m, 12h, 30d)")
}

func parseArguments() -> (options: [String: [String]], flags: Set<String>) {
  var options: [String: [String]] = [:]
  var flags: Set<String> = []
  var arguments = Array(CommandLine.arguments.dropFirst())
  while !arguments.isEmpty {
    let name = arguments.removeFirst()
    switch name {
    case "--help", "-h":
      print(usage)
      exit(0)
    case "--channel-binding": flags.insert(name)
    case _ where name.hasPrefix("--"):
      guard !arguments.isEmpty else { fail("\(name) needs a value") }
      options[name, default: []].append(arguments.removeFirst())
    default: fail("unexpected argument \(name)\n\(usage)")
    }
  }
  return (options, flags)
}
let (options, flags) = parseArguments()
func option(_ name: String) -> String? { options[name]?.last }
func number(_ name: String, _ fallback: Int) -> Int {
  guard let text = option(name) else { return fallback }
  guard let value = Int(text), value >= 0 else { fail("\(name) takes a number, not \(text)") }
  return value
}
func required(_ name: String) -> String {
  guard let value = option(name) else { fail("\(name) is required\n\(usage)") }
  return value
}

let ca: CertificateAuthority
do {
  switch (option("--ca-key"), option("--ca-key-tpm")) {
  case (let file?, nil):
    ca = try CertificateAuthority(chainPEM: readText(required("--ca-cert")), keyPEM: readText(file))
  case (nil, let keyFile?):
    // The station's own TPM holds the CA key; every certificate is signed there.
    let tpm = try TPM.open(tcti: option("--tcti"))
    let key = try tpm.loadKey(try TSS2PrivateKey(contentsOf: keyFile))
    ca = try CertificateAuthority(chainPEM: readText(required("--ca-cert")), key: key)
  default: fail("one of --ca-key PEM or --ca-key-tpm KEYFILE is required\n\(usage)")
  }
} catch { fail("\(error)") }
var caCertificates = ca.chain
if let path = option("--cacerts") {
  do { caCertificates = try Certificate.chain(pem: readText(path)) } catch { fail("--cacerts: \(error.reason)") }
}
var bootstrapCAs: [Certificate] = []
for path in options["--bootstrap-ca"] ?? [] {
  do { bootstrapCAs += try Certificate.chain(pem: readText(path)) } catch { fail("--bootstrap-ca: \(error.reason)") }
}
var user: String?
var password: String?
if let credentials = option("--password") ?? ProcessInfo.processInfo.environment["EDGEKEY_RA_PASSWORD"] {
  guard let colon = credentials.firstIndex(of: ":") else { fail("--password takes USER:PASS") }
  user = String(credentials[..<colon])
  password = String(credentials[credentials.index(after: colon)...])
}
if bootstrapCAs.isEmpty && user == nil {
  FileHandle.standardError.write(
    Data("edgekey-ra: no --bootstrap-ca or --password: only re-enrollment is possible\n".utf8))
}

let policy = ESTPolicy(
  caCertificates: caCertificates, bootstrapUser: user, bootstrapPassword: password, bootstrapCAs: bootstrapCAs,
  lifetime: duration(option("--lifetime") ?? "30d"), backdate: duration(option("--backdate") ?? "60"),
  pendingTries: number("--pending", 0),
  retryAfterSeconds: number("--retry-after", 1),
  requireChannelBinding: flags.contains("--channel-binding"), label: option("--label"),
  issuanceLogPath: option("--log"))
var reenrollPolicy = policy
if let credentials = option("--reenroll-password") {
  guard let colon = credentials.firstIndex(of: ":") else { fail("--reenroll-password takes USER:PASS") }
  reenrollPolicy.reenrollUser = String(credentials[..<colon])
  reenrollPolicy.reenrollPassword = String(credentials[credentials.index(after: colon)...])
}
if let path = option("--csrattrs") {
  guard let data = FileManager.default.contents(atPath: path) else { fail("--csrattrs: cannot read \(path)") }
  let bytes = [UInt8](data)
  reenrollPolicy.csrAttributesDER = bytes.first == 0x30 ? bytes : ESTService.decodeBase64(bytes)
  guard reenrollPolicy.csrAttributesDER != nil else { fail("--csrattrs: neither DER nor base64") }
}
let service = ESTService(ca: ca, policy: reenrollPolicy)

// Client certificates accepted at the TLS layer: bootstrap identities and our own devices'.
let clientCAs = (bootstrapCAs + ca.chain + caCertificates).map(\.pem).joined()
var limits = HTTPServerLimits()
limits.maximumBodyBytes = number("--max-body", limits.maximumBodyBytes)
let tlsMax: Int32
switch option("--tls-max") ?? "1.3" {
case "1.2": tlsMax = 0x0303
case "1.3": tlsMax = 0x0304
default: fail("--tls-max takes 1.2 or 1.3")
}
let chainPEM = readText(required("--tls-cert"))
let keyPEM = readText(required("--tls-key"))
var why = [CChar](repeating: 0, count: 512)
let context: OpaquePointer? = chainPEM.withCString { chain in
  keyPEM.withCString { key in
    clientCAs.withCString { clients in
      var config = edgekey_tls_server_config()
      config.chain_pem = chain
      config.key_pem = key
      config.client_ca_pem = clients
      config.require_client_certificate = 0
      config.max_version = tlsMax
      return edgekey_tls_server_ctx(&config, &why, why.count)
    }
  }
}
guard let context else {
  fail("TLS: \(String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
}

let listen = option("--listen") ?? "127.0.0.1:8443"
guard let colon = listen.lastIndex(of: ":"), let port = UInt16(listen[listen.index(after: colon)...]) else {
  fail("--listen takes HOST:PORT")
}
let host = String(listen[..<colon])

// Block the stop signals before any thread starts, so that only sigwait below receives them.
var stopSignals = sigset_t()
sigemptyset(&stopSignals)
sigaddset(&stopSignals, SIGTERM)
sigaddset(&stopSignals, SIGINT)
pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

let server = HTTPSServer(context: context, limits: limits, handler: service.handle)
do { try server.start(host: host, port: port) } catch { fail("\(error)") }
FileHandle.standardOutput.write(Data("listening on https://\(host):\(server.port)\n".utf8))

var received: Int32 = 0
sigwait(&stopSignals, &received)
server.stop()
print("stopped after issuing \(service.issued) certificate(s)")
