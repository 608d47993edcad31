import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// The key named by `--file FILE` or `--handle H`.
func loadKeyOption(_ args: Arguments, tpm: TPM) throws -> TPMKey {
  if let path = args.option("file") {
    return try tpm.loadKey(try TSS2PrivateKey(contentsOf: path), authValue: authValue(args))
  }
  if let handle = handleOption(args) { return try tpm.loadKey(at: handle, authValue: authValue(args)) }
  fail("name the key with --file FILE or --handle H", .usage)
}

func readText(_ path: String) -> String {
  guard let f = fopen(path, "r") else { fail("cannot read \(path): \(String(cString: strerror(errno)))", .failure) }
  defer { fclose(f) }
  var bytes: [UInt8] = []
  var buffer = [UInt8](repeating: 0, count: 65536)
  while true {
    let n = fread(&buffer, 1, buffer.count, f)
    if n <= 0 { break }
    bytes += buffer[0..<n]
  }
  return String(decoding: bytes, as: UTF8.self)
}

/// `CN=device-1,O=Acme` → [("CN","device-1"),("O","Acme")].
func parseSubject(_ text: String) -> [(String, String)] {
  text.split(separator: ",").map { part in
    guard let eq = part.firstIndex(of: "=") else { fail("subject part '\(part)' is not NAME=value", .usage) }
    return (
      String(part[..<eq]).trimmingSpaces, String(part[part.index(after: eq)...]).trimmingSpaces
    )
  }
}

/// `DNS:a.example,IP:10.0.0.1,URI:urn:x` → SANs.
func parseSANs(_ text: String) -> [SubjectAlternativeName] {
  text.split(separator: ",").map { part in
    let s = String(part).trimmingSpaces
    if s.hasPrefix("DNS:") { return .dns(String(s.dropFirst(4))) }
    if s.hasPrefix("IP:") { return .ip(String(s.dropFirst(3))) }
    if s.hasPrefix("URI:") { return .uri(String(s.dropFirst(4))) }
    if s.hasPrefix("email:") { return .email(String(s.dropFirst(6))) }
    fail("subject alternative name '\(s)' needs a DNS:, IP:, URI: or email: prefix", .usage)
  }
}

extension String {
  var trimmingSpaces: String {
    var s = Substring(self)
    while s.first == " " { s = s.dropFirst() }
    while s.last == " " { s = s.dropLast() }
    return String(s)
  }
}

func csrCommand(_ args: Arguments, logger: Logger) throws {
  guard let subject = args.option("subject") else { fail("csr needs --subject \"CN=...\"", .usage) }
  let tpm = openTPM(args, logger: logger)
  let key = try loadKeyOption(args, tpm: tpm)
  var challenge: String? = nil
  if let variable = args.option("challenge-env") {
    guard let value = getenv(variable) else { fail("environment variable \(variable) is not set", .usage) }
    challenge = String(cString: value)
  }
  let csr = try CertificateSigningRequest(
    key: key, subject: parseSubject(subject), subjectAlternativeNames: args.option("san").map(parseSANs) ?? [],
    challengePassword: challenge)
  if let path = args.option("out") {
    try AtomicFile.write(Array(csr.pem.utf8), to: path, mode: 0o644)
    out("wrote \(path)")
  } else {
    out(csr.pem, terminator: "")
  }
}

/// One line of the doctor's walk.
func report(_ ok: Bool, _ layer: String, _ detail: String) {
  out("\(ok ? "✓" : "✗") \(layer.padded(to: 22)) \(detail)")
}

func days(until date: Double) -> String {
  let seconds = date - Double(time(nil))
  let magnitude = abs(seconds)
  let span =
    magnitude >= 86400
    ? "\(Int(magnitude / 86400)) days"
    : magnitude >= 3600
      ? "\(Int(magnitude / 3600)) hours"
      : magnitude >= 60
        ? "\(Int(magnitude / 60)) minutes"
        : "\(Int(magnitude)) seconds"
  return seconds >= 0 ? "expires in \(span)" : "expired \(span) ago"
}

/// Walks the layers the mTLS guide names and stops at the first that fails.
func doctorCommand(_ args: Arguments, logger: Logger) throws {
  guard let host = args.option("host"), let portText = args.option("port"), let port = UInt16(portText) else {
    fail("doctor needs --host H and --port P", .usage)
  }
  guard let caFile = args.option("cafile"), let certFile = args.option("cert") else {
    fail("doctor needs --cafile CA.pem and --cert CERT.pem", .usage)
  }
  // 1. The TPM and the key.
  let (tpm, key) = doctorKey(args, logger: logger)
  report(
    true, "TPM and key",
    "\(tpm.tcti): \(key.algorithm?.rawValue ?? "key") sha256:\(key.publicKey.fingerprint.prefix(16))…, loaded")

  // 2. Our certificate, and the policy for the server.
  let (chain, context) = doctorContext(args, key: key, host: host, caFile: caFile, certFile: certFile)
  let leaf = chain[0]
  report(
    true, "our certificate",
    "\(leaf.subject) from \(leaf.issuer), clientAuth, matches the key, \(days(until: leaf.notAfter.timeIntervalSince1970))"
  )

  // The device's attestation (with --state): whether its keys are certified by an activated AK.
  if let state = args.option("state") {
    let status = (try? CredentialStore(directory: state)).map { AttestationStatus.read($0) }
    switch status?.state {
    case "activated"?:
      report(
        true, "attestation",
        "attestation key certified by \(status!.certificate!.issuer) until \(status!.certificate!.notAfter): new keys are attested"
      )
    case "certificate expired"?:
      report(
        false, "attestation",
        "the attestation key's certificate expired at \(status!.certificate!.notAfter): run provision --attest again")
    case "key made, not activated"?:
      report(false, "attestation", "an attestation key exists but the RA never certified it: run provision --attest")
    default:
      report(true, "attestation", "none: this device's keys are not attested (provision --attest)")
    }
  }

  // 3-5. The connection: server chain, protocol, the server's verdict on us.
  let connection = doctorConnect(context, host: host, port: port)
  if let peer = connection.peerCertificate {
    report(
      true, "server certificate",
      "\(peer.subject) from \(peer.issuer), trusted, names \(args.option("server-name") ?? host), serverAuth, \(days(until: peer.notAfter.timeIntervalSince1970))"
    )
  }
  report(true, "protocol", "\(connection.protocolVersion), \(connection.cipherSuite)")
  guard args.option("protocol") != "tls" else {
    report(true, "server accepted us", "handshake complete (TLS only: no MQTT CONNECT sent)")
    return
  }
  if args.option("protocol") == "est" {
    doctorEST(args, host: host, port: port, chain: chain, key: key, caFile: caFile)
    return
  }
  // An MQTT CONNECT: with TLS 1.3 the server's verdict on our certificate arrives here. MQTT 5
  // when pinned, else 3.1.1, which every broker answers.
  var configuration = MQTTConfiguration(host: host, port: port, clientID: args.option("client-id") ?? "edgekey-doctor")
  applyMQTTOptions(args, to: &configuration)
  let v5 = configuration.protocolVersion == .v5
  let connack = doctorMQTTConnect(connection, clientID: configuration.clientID!, v5: v5)
  guard connack.count >= 4, connack[0] == 0x20 else {
    report(
      false, "server accepted us",
      connection.acceptedOurCertificate
        ? "the server accepted our certificate, then closed the connection after our MQTT \(v5 ? "5" : "3.1.1") "
          + "CONNECT without a CONNACK\(v5 ? ": it may speak only MQTT 3.1.1 (-V 311 or auto)" : "")"
        : "the server closed the connection after CONNECT (no CONNACK)")
    exit(ExitCode.failure.rawValue)
  }
  report(true, "server accepted us", "TLS client authentication passed")
  let reasons: [Int: String] =
    v5
    ? [
      0x84: "unsupported protocol version", 0x85: "client identifier not valid", 0x86: "bad user name or password",
      0x87: "not authorized", 0x88: "server unavailable", 0x8A: "banned",
    ]
    : [
      1: "unacceptable protocol version", 2: "client identifier rejected", 3: "server unavailable",
      4: "bad user name or password", 5: "not authorized",
    ]
  if connack[3] == 0 {
    report(true, "MQTT connect", "CONNACK accepted (MQTT \(v5 ? "5" : "3.1.1"))")
  } else {
    report(false, "MQTT connect", "CONNACK refused: \(reasons[Int(connack[3])] ?? "code \(connack[3])")")
    exit(ExitCode.failure.rawValue)
  }
  // Authorization: mTLS proved who we are; the broker's ACL decides what we may do. An MQTT 5
  // PUBACK carries its verdict on one QoS 1 message.
  let topic = args.option("topic") ?? "devices/\(leaf.commonName ?? "edgekey")/doctor"
  configuration.reconnect = ReconnectPolicy(
    initialDelay: .milliseconds(200), maximumDelay: .seconds(1), stableAfter: .seconds(1),
    refusedInitialDelay: .seconds(60), refusedMaximumDelay: .seconds(60))
  nonisolated(unsafe) var verdict: (Bool, String) = (false, "")
  let client: MQTTClient
  do { client = try MQTTClient(configuration, tls: context) } catch {
    report(false, "authorized to publish", "\(error)")
    exit(ExitCode.failure.rawValue)
  }
  runAsync {
    do {
      try await client.connect(timeout: .seconds(10))
      try await client.publish(topic: topic, payload: Array("edgekey doctor".utf8), qos: .atLeastOnce)
      if client.protocolVersionInUse == .v311 {
        // MQTT 3.1.1's PUBACK has no reason code: a broker acknowledges a publish its ACL
        // dropped exactly as one it delivered.
        verdict = (
          true,
          "\(topic): PUBACK, but not judged: MQTT 3.1.1 carries no reason code, so a publish the ACL "
            + "denies is acknowledged the same (MQTT 5 tells)"
        )
      } else {
        verdict = (true, "\(topic): accepted (PUBACK)")
      }
    } catch let error as MQTTError {
      if case .rejected = error.kind {
        verdict = (false, "\(topic): \(error.reason); the broker's ACL does not let \(leaf.subject) publish there")
      } else {
        verdict = (false, "\(topic): \(error.reason)")
      }
    }
    await client.stop()
  }
  report(verdict.0, "authorized to publish", verdict.1)
  if !verdict.0 { exit(ExitCode.failure.rawValue) }
}

/// The EST layers, after the TLS ones: the server's verdict on our certificate (an HTTP request
/// over the same policy, through libcurl as enrollment makes it), `cacerts`, `csrattrs`.
func doctorEST(_ args: Arguments, host: String, port: UInt16, chain: [Certificate], key: TPMKey, caFile: String) {
  do {
    var options = ESTOptions()
    options.timeout = .seconds(15)
    let crl = crlOptions(args, trustPEM: readText(caFile))
    options.crlPEM = crl.pem
    options.missingCRL = crl.missing
    options.allowServerCertificateWithoutEKU = args.flag("allow-server-without-eku")
    let server = try ESTServer(
      url: "https://\(host.contains(":") ? "[\(host)]" : host):\(port)", label: args.option("label"))
    let client = try ESTClient(
      server: server, trustAnchors: try Certificate.chain(pem: readText(caFile)), options: options)
    let authentication = ESTAuthentication.certificate(chain, key: key)
    let cas = try client.caCertificates()
    report(true, "EST cacerts", "\(cas.count) certificate(s): \(cas.map(\.subject).joined(separator: "; "))")
    let attributes = try client.csrAttributes(authentication: authentication)
    report(
      true, "EST csrattrs",
      "with our certificate presented (HTTPS through libcurl): "
        + (attributes.isEmpty ? "no preference (204)" : attributes.joined(separator: ", ")))
    // Not tried: a real simplereenroll would issue a certificate. Only what the CAs say.
    let ours = cas.contains { anchor in chain.contains { $0.isIssued(by: anchor) } }
    if ours {
      out(
        "· \("re-enrollment".padded(to: 22)) not checked (only a real simplereenroll tells): our certificate "
          + "comes from a CA this server publishes")
    } else {
      report(
        false, "re-enrollment", "no CA this server publishes issued our certificate: re-enrollment will be refused")
      exit(ExitCode.failure.rawValue)
    }
  } catch let error as EnrollmentError {
    let layer =
      switch error.kind {
      case .tls: error.tls?.layer == .rejectedByServer ? "server accepted us" : "TLS"
      case .server: "EST request"
      default: "EST"
      }
    report(false, layer, error.description)
    exit(ExitCode.failure.rawValue)
  } catch {
    report(false, "EST", "\(error)")
    exit(ExitCode.failure.rawValue)
  }
}

/// An MQTT 3.1.1 CONNECT packet (clean session, keepalive 30).
func mqttConnectPacket(clientID: String) -> [UInt8] {
  let id = Array(clientID.utf8.prefix(100))
  let variable: [UInt8] = [0, 4] + Array("MQTT".utf8) + [4, 0x02, 0, 30]
  let payload: [UInt8] = [UInt8(id.count >> 8), UInt8(id.count & 0xFF)] + id
  return [0x10, UInt8(variable.count + payload.count)] + variable + payload
}

/// An MQTT 5 CONNECT packet (clean start, keepalive 30, no properties).
func mqtt5ConnectPacket(clientID: String) -> [UInt8] {
  let id = Array(clientID.utf8.prefix(100))
  let variable: [UInt8] = [0, 4] + Array("MQTT".utf8) + [5, 0x02, 0, 30, 0]
  let payload: [UInt8] = [UInt8(id.count >> 8), UInt8(id.count & 0xFF)] + id
  return [0x10, UInt8(variable.count + payload.count)] + variable + payload
}

/// MQTT CONNECT (3.1.1, or 5); returns the CONNACK bytes (flags and reason code at 2 and 3 in
/// both versions).
func doctorMQTTConnect(_ connection: TLSConnection, clientID: String, v5: Bool) -> [UInt8] {
  do {
    try connection.write(v5 ? mqtt5ConnectPacket(clientID: clientID) : mqttConnectPacket(clientID: clientID))
    return try connection.read()
  } catch {
    report(false, error.layer == .rejectedByServer ? "server accepted us" : error.layer.rawValue, error.description)
    exit(ExitCode.failure.rawValue)
  }
}

func doctorKey(_ args: Arguments, logger: Logger) -> (TPM, TPMKey) {
  do {
    let tpm = try TPM.open(tcti: args.option("tcti"), logger: logger)
    let key = try loadKeyOption(args, tpm: tpm)
    try key.load()
    return (tpm, key)
  } catch {
    report(false, "TPM and key", "\(error)")
    exit(ExitCode.failure.rawValue)
  }
}

func doctorContext(_ args: Arguments, key: TPMKey, host: String, caFile: String, certFile: String) -> (
  [Certificate], TLSClientContext
) {
  do {
    let chain = try Certificate.chain(pem: readText(certFile))
    var maximum = TLSVersion.tls13
    if let text = args.option("tls-max") {
      guard let v = ["1.2": TLSVersion.tls12, "1.3": .tls13][text] else { fail("--tls-max 1.2 or 1.3", .usage) }
      maximum = v
    }
    var policy = brokerPolicy(args, host: host, caFile: caFile)
    policy.maximumVersion = maximum
    if args.option("protocol") == "est" {
      // An EST server may show id-kp-cmcRA instead of serverAuth (RFC 7030 §3.6.1).
      policy.acceptCMCRA = true
      policy.requireServerAuth = !args.flag("allow-server-without-eku")
    }
    let context = try TLSClientContext(certificateChain: chain, key: key, policy: policy)
    return (chain, context)
  } catch {
    report(false, error.layer == .clientCertificate ? "our certificate" : "configuration", error.description)
    exit(ExitCode.failure.rawValue)
  }
}

func doctorConnect(_ context: TLSClientContext, host: String, port: UInt16) -> TLSConnection {
  do {
    return try TLSConnection(context: context, host: host, port: port)
  } catch {
    let layer =
      switch error.layer {
      case .serverCertificate: "server certificate"
      case .protocol: "protocol"
      case .rejectedByServer: "server accepted us"
      case .tpm: "TPM signature"
      case .network: "network"
      default: "TLS"
      }
    report(false, layer, error.description)
    exit(ExitCode.failure.rawValue)
  }
}
