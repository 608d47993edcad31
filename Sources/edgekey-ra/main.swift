// edgekey-ra: the registration authority (EST server, RFC 7030) for the factory line and tests.
internal import CEdgeKeyProvider
import EdgeKeyCore
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

let usage = """
  usage: edgekey-ra --tls-cert PEM --tls-key PEM --ca-cert PEM (--ca-key PEM | --ca-key-tpm KEYFILE)
                    --registry PATH [options]
         edgekey-ra admin --registry PATH COMMAND ...   (edgekey-ra admin --help)

  An EST server (RFC 7030): /.well-known/est[/LABEL]/{cacerts,csrattrs,simpleenroll,simplereenroll},
  and the CA's CRL at /crl (DER) and /crl.pem.

  Who may enrol which name (the device registry):
    --registry PATH        the device registry (SQLite); devices are added with `admin import`
    --reserve NAME         a name or pattern (* ?) never issued to a device (repeatable)
    --reserve-from-acl FILE
                           reserve every `user NAME` of a mosquitto ACL (operator identities)
    --bootstrap-ca PEM     client certificates from this CA may enroll: those in the registry,
                           or any, under --bootstrap-name (repeatable)
    --bootstrap-name TEMPLATE
                           the name a bootstrap certificate not in the registry enrols, {cn} for
                           its common name (e.g. device-{cn}); it becomes the device's id
    --bootstrap-reenrol allow|refuse
                           whether a bootstrap certificate may enrol its device again after the
                           operational certificate was lost (default allow; the old ones are
                           revoked as superseded)
    --allow-shared-password
                           accept one password for every device (--password), for names matching
                           --name-pattern only; each such issuance is logged as such
    --password USER:PASS   the shared password (or EDGEKEY_RA_PASSWORD); needs the flag above
    --name-pattern GLOB    the names the shared password may enrol (* and ?)
    --subject-attributes LIST
                           subject attributes allowed besides CN (default O,OU,C,ST,L)
    --allow-san TEMPLATE   a subject alternative name a device may have, {name} for its name
                           (e.g. DNS:{name}.fleet.local; repeatable; default none)
    --max-name-length N    longest name (default 64)
    --rate-per-source N/PERIOD, --rate-per-credential N/PERIOD
                           enrollment requests allowed (default 600/1m and 60/1m; "off"); more
                           get 429 with Retry-After

  Key attestation (TPM2_Certify evidence in requests, draft-ietf-lamps-csr-attestation):
    --ek-ca PEM            TPM manufacturers' CAs that endorsement key certificates must chain
                           to (repeatable); enables /nonce, /attest-activate, /attest-akcert
    --require-attestation  refuse every request whose key is not attested (without it, devices
                           an operator marked, and devices with an activated AK, must attest)
    --nonce-lifetime SECONDS
                           how long a nonce may be used, once (default 300)
    --ak-lifetime DURATION lifetime of attestation key certificates (default 3650d)

  Revocation:
    --crl-out FILE         write the current CRL here (PEM, 0644) for a broker's crlfile
    --crl-validity DURATION
                           each CRL's nextUpdate (default 1d); it is remade at half of that, and
                           within a second of a revocation
    --crl-url URL          put in issued certificates as the CRL distribution point

    --listen HOST:PORT     where to listen (default 127.0.0.1:8443; port 0 picks a free one)
    --tls-cert PEM         the server's certificate chain (serverAuth)
    --tls-key PEM          the server's private key
    --ca-cert PEM          the issuing CA's certificate, then any CA above it
    --ca-key PEM           the issuing CA's private key, in a file
    --ca-key-tpm KEYFILE   or held in this station's TPM (a TSS2 PRIVATE KEY file; --tcti T)
    --tcti T               the TPM for --ca-key-tpm (default: $EDGEKEY_TCTI, then /dev/tpmrm0)
    --cacerts PEM          what cacerts returns (default: the CA chain); for CA rollover
    --max-connections N    connections served at once (default 64; more wait to be accepted)
    --max-per-source N     connections from one address at once (default 16)
    --request-timeout SECONDS
                           the whole of a request, handshake included (default 10)
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

func duration(_ text: String) -> Duration {
  let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
  if let unit = text.last, let scale = units[unit], let value = Double(text.dropLast()), value >= 0 {
    return .seconds(value * scale)
  }
  if let value = Double(text), value >= 0 { return .seconds(value) }
  fail("\(text) is not a duration (90s, 15m, 12h, 30d)")
}

if CommandLine.arguments.dropFirst().first == "admin" { runAdmin(Array(CommandLine.arguments.dropFirst(2))) }

/// `--name value` options (repeatable), `--flag`s from `known`, and, when `usage` allows them,
/// positional words; `--help` prints `usage`.
func parseArguments(_ words: [String], flags known: Set<String>, usage: String, positional: Bool = false)
  -> (options: [String: [String]], flags: Set<String>, positional: [String])
{
  var options: [String: [String]] = [:]
  var flags: Set<String> = []
  var words = words
  var rest: [String] = []
  while !words.isEmpty {
    let name = words.removeFirst()
    switch name {
    case "--help", "-h":
      print(usage)
      exit(0)
    case _ where known.contains(name): flags.insert(name)
    case _ where name.hasPrefix("--"):
      guard !words.isEmpty else { fail("\(name) needs a value") }
      options[name, default: []].append(words.removeFirst())
    case _ where positional: rest.append(name)
    default: fail("unexpected argument \(name)\n\(usage)")
    }
  }
  return (options, flags, rest)
}
let (options, flags, _) = parseArguments(
  Array(CommandLine.arguments.dropFirst()),
  flags: ["--channel-binding", "--allow-shared-password", "--require-attestation"],
  usage: usage)
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
var naming = NamingPolicy()
if user != nil || flags.contains("--allow-shared-password") {
  guard flags.contains("--allow-shared-password"), user != nil else {
    fail(
      "a shared password lets anyone who has it enrol: it needs both --password and --allow-shared-password (and --name-pattern); per-device one-time secrets come from `admin import`"
    )
  }
  guard let pattern = option("--name-pattern") else { fail("--allow-shared-password needs --name-pattern GLOB") }
  naming.sharedPasswordPattern = pattern
  FileHandle.standardError.write(
    Data("edgekey-ra: WARNING: the shared password of \(user!) enrols any unused name matching \(pattern)\n".utf8))
}
naming.reserved = options["--reserve"] ?? []
for path in options["--reserve-from-acl"] ?? [] { naming.reserved += NamingPolicy.aclUsers(readText(path)) }
naming.bootstrapNameTemplate = option("--bootstrap-name")
switch option("--bootstrap-reenrol") ?? "allow" {
case "allow": naming.reenrolAfterLoss = true
case "refuse": naming.reenrolAfterLoss = false
default: fail("--bootstrap-reenrol takes allow or refuse")
}
if let list = option("--subject-attributes") {
  naming.subjectAttributes = Set(list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
}
naming.subjectAlternativeNames = options["--allow-san"] ?? []
naming.maximumLength = number("--max-name-length", naming.maximumLength)

let registry: DeviceRegistry
do {
  registry = try DeviceRegistry(path: required("--registry"))
  // The reserved names are kept in the registry, so that `admin import` refuses them too.
  let known = Set(try registry.reserved())
  let new = naming.reserved.filter { !known.contains($0) }
  if !new.isEmpty { try registry.reserve(new, source: "edgekey-ra --reserve") }
} catch { fail("--registry: \(error)") }
if bootstrapCAs.isEmpty && naming.sharedPasswordPattern == nil && (try? registry.deviceCount()) ?? 0 == 0 {
  FileHandle.standardError.write(
    Data(
      "edgekey-ra: the registry has no devices and there is no --bootstrap-ca: only re-enrollment is possible\n".utf8))
}
func rate(_ name: String, _ fallback: Rate?) -> Rate? {
  guard let text = option(name) else { return fallback }
  if text == "off" { return nil }
  guard let rate = Rate(parsing: text) else { fail("\(name) takes N/PERIOD (10/1m, 600/60s) or off") }
  return rate
}

let policy = ESTPolicy(
  caCertificates: caCertificates, bootstrapUser: user, bootstrapPassword: password, bootstrapCAs: bootstrapCAs,
  lifetime: duration(option("--lifetime") ?? "30d"), backdate: duration(option("--backdate") ?? "60"),
  pendingTries: number("--pending", 0),
  retryAfter: .seconds(number("--retry-after", 1)),
  requireChannelBinding: flags.contains("--channel-binding"), label: option("--label"),
  issuanceLogPath: option("--log"))
var reenrollPolicy = policy
reenrollPolicy.crlDistributionPoint = option("--crl-url")
reenrollPolicy.rateLimits.perSource = rate("--rate-per-source", reenrollPolicy.rateLimits.perSource)
reenrollPolicy.rateLimits.perCredential = rate("--rate-per-credential", reenrollPolicy.rateLimits.perCredential)
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
let raLogger = Logger(label: "edgekey-ra", level: .info, handler: StandardErrorLogHandler())
let crl = CRLPublisher(
  ca: ca, registry: registry, validity: duration(option("--crl-validity") ?? "1d"), path: option("--crl-out"),
  logger: raLogger)
do { _ = try crl.current() } catch { fail("the CRL: \(error)") }
var attestationPolicy: AttestationPolicy? = nil
var manufacturerCAs: [Certificate] = []
for path in options["--ek-ca"] ?? [] {
  do { manufacturerCAs += try Certificate.chain(pem: readText(path)) } catch {
    fail("--ek-ca \(path): \(error.reason)")
  }
}
if !manufacturerCAs.isEmpty {
  attestationPolicy = AttestationPolicy(
    manufacturerCAs: manufacturerCAs, requireForAll: flags.contains("--require-attestation"),
    nonceLifetime: .seconds(number("--nonce-lifetime", 300)),
    attestationKeyCertificateLifetime: duration(option("--ak-lifetime") ?? "3650d"))
} else if flags.contains("--require-attestation") {
  fail("--require-attestation needs --ek-ca: the manufacturer CAs that vouch for TPMs")
}
let service = ESTService(
  ca: ca, policy: reenrollPolicy, registry: registry, naming: naming, revocation: crl, attestation: attestationPolicy,
  logger: raLogger)

// Client certificates accepted at the TLS layer: bootstrap identities and our own devices'.
let clientCAs = (bootstrapCAs + ca.chain + caCertificates).map(\.pem).joined()
var limits = HTTPServerLimits()
limits.maximumBodyBytes = number("--max-body", limits.maximumBodyBytes)
limits.maximumConnections = max(1, number("--max-connections", limits.maximumConnections))
limits.maximumConnectionsPerSource = max(1, number("--max-per-source", limits.maximumConnectionsPerSource))
if let text = option("--request-timeout") {
  guard let seconds = Double(text), seconds > 0 else { fail("--request-timeout takes seconds") }
  limits.requestTimeout = .milliseconds(Int64(seconds * 1000))
}
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

// A server: a write to a client that is gone must not end it. The library's sockets already
// write with MSG_NOSIGNAL; this covers anything else the process writes (its log, a pipe).
signal(SIGPIPE, SIG_IGN)
// Block the stop signals before any thread starts, so that only sigwait below receives them.
var stopSignals = sigset_t()
sigemptyset(&stopSignals)
sigaddset(&stopSignals, SIGTERM)
sigaddset(&stopSignals, SIGINT)
pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

let server = HTTPSServer(context: context, limits: limits, handler: service.handle)
do { try server.start(host: host, port: port) } catch { fail("\(error)") }
crl.start()
FileHandle.standardOutput.write(Data("listening on https://\(host):\(server.port)\n".utf8))

var received: Int32 = 0
sigwait(&stopSignals, &received)
server.stop()
crl.stop()
print("stopped after issuing \(service.issued) certificate(s)")
