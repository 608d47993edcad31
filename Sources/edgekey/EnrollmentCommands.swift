import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// The settings `enroll` and `renew` share: --state DIR --server URL --cafile CA [--label L]
/// [--password-env VAR].
func enrollmentSettings(_ args: Arguments, logger: Logger) -> (CredentialStore, EnrollmentSettings) {
  guard let state = args.option("state") else { fail("needs --state DIR (the credential store)", .usage) }
  guard let url = args.option("server") else { fail("needs --server https://HOST:PORT (the EST server)", .usage) }
  guard let caFile = args.option("cafile") else { fail("needs --cafile CA.pem (trust for the EST server)", .usage) }
  let anchors: [Certificate]
  do {
    anchors = try Certificate.chain(pem: String(decoding: try AtomicFile.read(caFile, limit: 1 << 20), as: UTF8.self))
  } catch {
    fail("--cafile \(caFile): \(error)", .usage)
  }
  var password: (user: String, password: String)?
  if let variable = args.option("password-env") {
    guard let value = getenv(variable) else { fail("environment variable \(variable) is not set", .usage) }
    let text = String(cString: value)
    guard let colon = text.firstIndex(of: ":") else { fail("\(variable) must hold USER:PASSWORD", .usage) }
    password = (String(text[..<colon]), String(text[text.index(after: colon)...]))
  }
  do {
    let store = try CredentialStore(directory: state)
    let server = try ESTServer(url: url, label: args.option("label"))
    var options = ESTOptions()
    let crl = crlOptions(args, trustPEM: anchors.map(\.pem).joined())
    options.crlPEM = crl.pem
    options.missingCRL = crl.missing
    options.allowServerCertificateWithoutEKU = args.flag("allow-server-without-eku")
    options.logger = logger.labeled("edgekey.est")
    var settings = EnrollmentSettings(server: server, trustAnchors: anchors, options: options, password: password)
    if args.flag("channel-binding") {
      // tls-unique exists in TLS 1.2 only (RFC 5929; RFC 8446 has no equivalent).
      settings.channelBinding = true
      settings.options.maximumVersion = .tls12
    }
    return (store, settings)
  } catch {
    fail(error.description, error.kind == .storage ? .failure : .usage)
  }
}

/// `--subject "O=..,CN=.."` and `--san ...`: what to request; nil without --subject.
func identityOption(_ args: Arguments) -> (subject: [(String, String)], names: [SubjectAlternativeName])? {
  args.option("subject").map { (subject: parseSubject($0), names: args.option("san").map(parseSANs) ?? []) }
}

/// `--algorithm A` for the key enrollment creates (P-256 by default), announced when slow.
func enrollmentPolicy(_ args: Arguments) -> RenewalPolicy {
  var policy = RenewalPolicy()
  policy.keyAlgorithm = algorithmOption(args)
  policy.attest = args.flag("attest")
  announceSlowKey(policy.keyAlgorithm)
  return policy
}

/// `--bootstrap-cert PEM --bootstrap-key KEYFILE`: the factory credential, copied into the store
/// and read back (which checks that the certificate is for that key).
func storeBootstrap(_ args: Arguments, in store: CredentialStore) throws {
  guard let certFile = args.option("bootstrap-cert") else { return }
  guard let keyFile = args.option("bootstrap-key") else { fail("--bootstrap-cert needs --bootstrap-key", .usage) }
  let chain = try Certificate.chain(pem: String(decoding: try AtomicFile.read(certFile, limit: 1 << 20), as: UTF8.self))
  try store.write(Credential(key: try TSS2PrivateKey(contentsOf: keyFile), chain: chain), to: .bootstrap)
  _ = try store.read(.bootstrap)
}

func credentialJSON(_ credential: Credential, store: CredentialStore, action: String, counters: RenewalCounters)
  -> String
{
  let cert = credential.certificate
  return "{\"action\":\(jsonString(action)),\"subject\":\(jsonString(cert?.subject ?? "")),"
    + "\"issuer\":\(jsonString(cert?.issuer ?? "")),\"serial\":\(jsonString(cert?.serialNumber ?? "")),"
    + "\"notAfter\":\(jsonString(cert?.summary.notAfter ?? "")),"
    + "\"keyFingerprint\":\(jsonString("sha256:" + ((try? credential.key.publicKey().fingerprint) ?? ""))),"
    + "\"keysCreated\":\(counters.keysCreated),\"state\":\(jsonString(store.path(.current)))}"
}

/// `edgekey enroll`: first enrollment (the factory line), with a bootstrap certificate and key
/// (copied into the store) and/or a password.
func enrollCommand(_ args: Arguments, logger: Logger) throws {
  let (store, settings) = enrollmentSettings(args, logger: logger)
  let tpm = openTPM(args, logger: logger)
  try storeBootstrap(args, in: store)
  let identity = identityOption(args)
  if try store.read(.current) != nil && !args.flag("force") {
    fail("\(store.path(.current)) exists: this device is enrolled (renew, or --force to enroll again)", .failure)
  }
  let policy = enrollmentPolicy(args)
  let agent = RenewalAgent(
    store: store, tpm: tpm, settings: settings, policy: policy, identity: identity,
    onEvent: { logger.info("\($0)") })
  let credential = try agent.renew().credential
  out(credentialJSON(credential, store: store, action: "enrolled", counters: agent.counters))
}

/// `edgekey renew`: renews now if due (or with --force); otherwise says when it will be.
func renewCommand(_ args: Arguments, logger: Logger) throws {
  let (store, settings) = enrollmentSettings(args, logger: logger)
  guard let current = try store.read(.current), let cert = current.certificate else {
    fail("\(store.path(.current)) holds no credential: enroll first", .failure)
  }
  var policy = RenewalPolicy()
  policy.rotateKeys = !args.flag("keep-key")
  let due = policy.renewalDate(for: cert)
  if due > Date() && !args.flag("force") {
    out(
      "{\"action\":\"none\",\"renewAt\":\(jsonString(Certificate.format(due))),"
        + "\"notAfter\":\(jsonString(cert.summary.notAfter))}")
    return
  }
  let tpm = openTPM(args, logger: logger)
  let agent = RenewalAgent(
    store: store, tpm: tpm, settings: settings, policy: policy, onEvent: { logger.info("\($0)") })
  let credential = try agent.renew().credential
  out(credentialJSON(credential, store: store, action: "renewed", counters: agent.counters))
}

/// `edgekey provision`: the factory line's one-shot for one device. Checks the TPM (reachable,
/// not in lockout, the key type supported, endorsement certificate present or not), enrolls
/// (key, CSR, EST, crash-safe store), and proves the result by connecting to the broker with it.
/// Prints one JSON line; exit 0 when the device is ready. Run again after an interruption (power
/// pulled, cable out), it resumes: the key already made is used, a finished enrollment is kept.
func provisionCommand(_ args: Arguments, logger: Logger) throws {
  let started = ContinuousClock.now
  let (store, settings) = enrollmentSettings(args, logger: logger)
  guard let host = args.option("host"), let port = UInt16(args.option("port") ?? "8883") else {
    fail("provision needs -h/--host H (the broker to verify with; -p/--port P, default 8883)", .usage)
  }
  var fields: [(String, String)] = []
  func report(ok: Bool, step: String? = nil, reason: String? = nil, code: ExitCode = .failure) -> Never {
    var all = [("ok", ok ? "true" : "false")] + fields
    if let step { all.append(("failedStep", jsonString(step))) }
    if let reason { all.append(("reason", jsonString(reason))) }
    all.append(("ms", String((ContinuousClock.now - started).milliseconds)))
    out("{" + all.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}")
    exit(ok ? 0 : code.rawValue)
  }
  let policy = enrollmentPolicy(args)

  // 1. The TPM's health.
  let tpm: TPM
  do { tpm = try TPM.open(tcti: args.option("tcti"), logger: logger) } catch {
    report(ok: false, step: "tpm", reason: error.description, code: .tpmUnreachable)
  }
  let info: TPMInfo
  do { info = try tpm.info() } catch { report(ok: false, step: "tpm", reason: error.description) }
  fields.append(
    (
      "tpm",
      "{\"manufacturer\":\(jsonString(info.manufacturer)),\"firmware\":\(jsonString(info.firmwareVersion)),"
        + "\"inLockout\":\(info.inLockout),\"supportsKey\":\(info.supportedKeys.contains(policy.keyAlgorithm)),"
        + "\"ekCertificate\":\(!info.endorsementCertificates.isEmpty)}"
    ))
  if info.inLockout {
    report(ok: false, step: "tpm", reason: "the TPM is in dictionary-attack lockout")
  }
  if !info.supportedKeys.contains(policy.keyAlgorithm) {
    report(ok: false, step: "tpm", reason: "the TPM cannot create \(policy.keyAlgorithm) keys")
  }

  // 2. Enrollment, or what an earlier run left.
  do { try storeBootstrap(args, in: store) } catch { report(ok: false, step: "bootstrap", reason: "\(error)") }
  let identity = identityOption(args)
  let agent = RenewalAgent(
    store: store, tpm: tpm, settings: settings, policy: policy, identity: identity, onEvent: { logger.info("\($0)") })
  var resumed = store.recovery.finishedSwitch || (try? store.read(.next)) != nil
  let credential: Credential
  do {
    // --attest on a device enrolled without it: enrol again, attested (its current certificate
    // authenticates the activation).
    let attestationCertificates = try store.attestationCertificates()
    let attestationMissing = policy.attest && attestationCertificates.isEmpty
    if let existing = try store.read(.current), existing.certificate?.isValid() == true, !attestationMissing,
      identity == nil
        || existing.certificate?.subjectFields.map({ "\($0.0)=\($0.1)" })
          == identity?.subject.map({ "\($0.0)=\($0.1)" })
    {
      credential = existing
      resumed = true
    } else {
      credential = try agent.renew().credential
    }
  } catch {
    report(ok: false, step: "enroll", reason: error.description)
  }
  let cert = credential.certificate!
  fields += [
    ("device", jsonString(cert.commonName ?? cert.subject)), ("subject", jsonString(cert.subject)),
    ("serial", jsonString(cert.serialNumber)), ("notAfter", jsonString(cert.summary.notAfter)),
    ("keyFingerprint", jsonString("sha256:" + ((try? credential.key.publicKey().fingerprint) ?? ""))),
    ("resumed", resumed ? "true" : "false"), ("state", jsonString(store.directory)),
    ("attestation", attestationJSON(AttestationStatus.read(store))),
  ]

  // 3. Proof: an mTLS connection and MQTT CONNECT with the stored credential.
  do {
    let key = try tpm.loadKey(credential.key)
    let context = try TLSClientContext(
      certificateChain: credential.chain, key: key,
      policy: brokerPolicy(args, host: host, caFile: args.option("broker-cafile") ?? args.option("cafile")!))
    let connection = try TLSConnection(context: context, host: host, port: port)
    try connection.write(mqttConnectPacket(clientID: cert.commonName ?? "edgekey-provision"))
    let connack = try connection.read()
    guard connack.count >= 4, connack[0] == 0x20, connack[3] == 0 else {
      report(ok: false, step: "verify", reason: "the broker refused the connection (CONNACK \(connack))")
    }
  } catch {
    report(ok: false, step: "verify", reason: "\(error)")
  }
  report(ok: true)
}

/// The attestation state as JSON: {"state", "attestationKeyCertificate"?: {subject, serial, notAfter}}.
func attestationJSON(_ status: AttestationStatus) -> String {
  var fields = ["\"state\":\(jsonString(status.state))"]
  if let c = status.certificate {
    fields.append(
      "\"attestationKeyCertificate\":{\"subject\":\(jsonString(c.subject)),\"issuer\":\(jsonString(c.issuer)),"
        + "\"notAfter\":\(jsonString(c.notAfter)),\"valid\":\(status.certificateValid)}")
  }
  return "{" + fields.joined(separator: ",") + "}"
}
