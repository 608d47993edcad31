import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM

#if canImport(Glibc)
  import Glibc
#endif

/// Exit codes, documented in `edgekey --help`.
enum ExitCode: Int32 {
  case ok = 0
  case failure = 1
  case usage = 2
  case tpmUnreachable = 3
}

let usage = """
  edgekey: device identity with keys held in a TPM 2.0

  Usage:
    edgekey tpm info [--json] [--state DIR]   the TPM: vendor, firmware, algorithms, curves, lockout
    edgekey key create [--algorithm A] (--out FILE | --handle H) [--auth-env VAR]
                                              create a non-exportable signing key in the TPM
    edgekey key show (--file FILE | --handle H) [--json]
                                              the key's type, attributes, fingerprint, public key
    edgekey key list                          keys persisted in the TPM
    edgekey key delete (--file FILE | --handle H)
                                              evict a persistent key, or remove a key file
    edgekey srk persist                       persist the storage root key at 0x81000001
    edgekey csr (--file FILE | --handle H) --subject "O=Acme,CN=device-1" [--san DNS:x,IP:y]
                [--challenge-env VAR] [--out FILE]
                                              a PKCS#10 request signed inside the TPM
    edgekey enroll --state DIR --server URL --cafile CA [--subject "O=Acme,CN=device-1"]
                [--san DNS:x] [--bootstrap-cert PEM --bootstrap-key KEYFILE] [--password-env VAR]
                [--algorithm A] [--label L] [--force] [--channel-binding] [--attest]
                                              first enrollment over EST (RFC 7030): a new TPM key,
                                              a CSR, the certificate, all kept in the state
                                              directory (crash-safe); one JSON line
    edgekey renew --state DIR --server URL --cafile CA [--force] [--keep-key]
                                              re-enroll if due (60-75 % of the lifetime) or forced,
                                              with a new TPM key unless --keep-key; one JSON line
    edgekey provision --state DIR --server URL --cafile CA --subject S -h BROKER [-p P]
                [--bootstrap-cert PEM --bootstrap-key KEYFILE] [--password-env VAR] [--algorithm A]
                [--attest]
                                              the factory line's one-shot: TPM health, key, enrollment,
                                              store, and a test connection to the broker; one JSON
                                              line; run again after an interruption, it resumes.
                                              --attest: first prove the TPM to the RA (EK certificate,
                                              an attestation key, credential activation), then every
                                              key is certified by that AK (TPM2_Certify), at this
                                              enrollment and every renewal after it
    edgekey agent --state DIR --server URL --cafile CA -h BROKER [-p P] [--broker-cafile CA]
                [-t TOPIC [--interval S] [-l]] [--outbox DB] [--subject ...] [--password-env VAR]
                [--renew-at 0.75] [--channel-binding] [--attest]
                                              the long-running device: enrolls if needed, keeps the
                                              MQTT connection, publishes, renews and switches to the
                                              new certificate; SIGTERM stops, SIGHUP reloads;
                                              writes DIR/status.json; systemd Type=notify ready
    edgekey status --state DIR [--json]       certificate, expiry, renewal moment, key, anchors, and
                                              what the agent last reported
    edgekey doctor --host H --port P --cafile CA --cert CERT (--file FILE | --handle H)
                [--server-name N] [--crl FILE] [--tls-max 1.2|1.3] [--protocol mqtt|tls|est]
                [-t TOPIC] [--state DIR]
                                              walk the mTLS layers to a broker or an EST server: TPM
                                              and key, our certificate, the server's chain, protocol,
                                              the server's verdict on us, then MQTT CONNECT and a
                                              QoS 1 publish the ACL must allow (or EST cacerts,
                                              csrattrs, re-enrollment); ✓/✗ each
    edgekey pub -h H [-p P] --cafile CA --cert CERT (--file FILE | --handle H) -t TOPIC
                (-m BYTES | -f FILE | -s | -l | --count N [--prefix P]) [-q 0|1|2] [-r]
                [--outbox DB] [--interval-ms MS] [--print-accepted] [--publishers N] [--timeout S]
                                              publish with the TPM key, like mosquitto_pub; payloads
                                              are bytes, sent unchanged (-f a file, -s all of stdin,
                                              -l a message per line); QoS ≥ 1 messages wait in the
                                              outbox (on disk with --outbox, which a later run
                                              delivers if this one is killed); --publishers N
                                              publishes from N tasks at once
    edgekey sub -h H [-p P] --cafile CA --cert CERT (--file FILE | --handle H) -t FILTER
                [-q 0|1|2] [--count N]
                                              print "topic payload" per message, like mosquitto_sub -v
                                              (the payload's bytes unchanged)

  Options:
    --tcti T        TCTI: device:/dev/tpmrm0, tabrmd, swtpm:host=127.0.0.1,port=2321
                    (default: $EDGEKEY_TCTI, then $TPM2TOOLS_TCTI, then device:/dev/tpmrm0)
    -a, --algorithm ecc-p256 (default) | ecc-p384 | rsa-2048 | rsa-3072
    -o, --out FILE  TSS2 PRIVATE KEY file (readable by tpm2-openssl and tpm2-tss-engine)
    -c, --handle H  persistent handle, e.g. 0x81000002
    --auth-env VAR  take the key's auth value from environment variable VAR (never argv)
    --password-env VAR  EST HTTP Basic credentials USER:PASSWORD from environment variable VAR
    -h, --host H    the broker (pub, sub, doctor); -p, --port P (default 8883)
    -i, --id ID     MQTT client id (default: our certificate's common name); doctor: --client-id ID
    -V, --protocol-version 5|311|auto  MQTT version for pub, sub, agent and doctor (default auto:
                    MQTT 5, and 3.1.1 for a broker that shows it does not speak 5)
    --disable-clean-session  a session that outlives the connection (pub, sub, agent)
    -x, --session-expiry-interval S  MQTT 5: how long the broker keeps it, in seconds (default
                    with --disable-clean-session: as long as the broker allows; as mosquitto_sub -x)
    --will-topic T [--will-payload BYTES] [--will-qos Q] [--will-retain]
                    a last will the broker publishes if we vanish (pub, sub, agent)
    --crl FILE      CRLs (PEM) for the server's chain, checked at every level (pub, sub, agent,
                    doctor, and the EST server for enroll, renew, provision, agent); a level whose
                    issuer has no CRL in FILE fails unless --allow-missing-crl
    --crl-url URL   the CA's CRL over HTTPS (edgekey-ra serves it at /crl), verified against the
                    CA file, kept in the state directory (crl.pem) and fetched again at half its
                    validity; the agent refreshes it while it runs. Used as --crl is.
    --alpn LIST     ALPN protocols to offer, comma-separated (AWS IoT Core on 443: x-amzn-mqtt-ca)
    --allow-server-without-eku  accept an EST server certificate with no extended key usage
                    (serverAuth and id-kp-cmcRA are accepted either way)
    --channel-binding  bind each EST request to its TLS connection (tls-unique; TLS 1.2)
    -v, --verbose   log to stderr
    --config FILE   take options from FILE, one "name = value" per line (the long option's name
                    without --; booleans true/false; # comments); the command line wins
    --help          this text

  Exit codes: 0 success, 1 failure (doctor: a layer failed), 2 usage error, 3 no TPM reachable.

  """

/// Every long option the usage names: the keys a `--config` file may set.
let longOptions: Set<String> = {
  var names: Set<String> = []
  var rest = Substring(usage)
  while let range = rest.firstRange(of: "--") {
    let name = rest[range.upperBound...].prefix { $0.isLowercase || $0.isNumber || $0 == "-" }
    if !name.isEmpty { names.insert(String(name)) }
    rest = rest[range.upperBound...]
  }
  return names
}()

/// The options each command reads: any other is a usage error, never accepted and ignored.
let commandOptions: [String: Set<String>] = {
  let key: Set<String> = ["file", "handle", "auth-env"]
  let serverTLS: Set<String> = ["server-name", "crl", "crl-url", "allow-missing-crl", "alpn"]
  let mqtt: Set<String> = [
    "protocol-version", "disable-clean-session", "session-expiry-interval", "will-topic", "will-payload", "will-qos",
    "will-retain",
  ]
  let est: Set<String> = [
    "state", "server", "cafile", "label", "password-env", "crl", "crl-url", "allow-missing-crl",
    "allow-server-without-eku",
    "channel-binding",
  ]
  let enrollment = est.union(["subject", "san", "bootstrap-cert", "bootstrap-key", "algorithm", "attest"])
  let client = key.union(serverTLS).union(mqtt).union([
    "host", "port", "cafile", "cert", "id", "topic", "qos", "timeout",
  ])
  return [
    "tpm info": ["json", "state"],
    "key create": ["algorithm", "out", "handle", "auth-env", "json"],
    "key show": key.union(["json"]),
    "key list": [],
    "key delete": ["file", "handle"],
    "srk persist": [],
    "csr": key.union(["subject", "san", "challenge-env", "out"]),
    "enroll": enrollment.union(["force"]),
    "renew": est.union(["force", "keep-key"]),
    "provision": enrollment.union(serverTLS).union(["host", "port", "broker-cafile"]),
    "agent": enrollment.union(serverTLS).union(mqtt).union([
      "host", "port", "broker-cafile", "id", "topic", "interval", "stdin-line", "outbox", "renew-at",
    ]),
    "status": ["state", "json"],
    "doctor": key.union(serverTLS).union(mqtt).union([
      "host", "port", "cafile", "cert", "tls-max", "protocol", "topic", "client-id", "label", "state",
      "allow-server-without-eku",
    ]),
    "pub": client.union([
      "message", "file-message", "stdin-file", "stdin-line", "count", "prefix", "retain", "outbox", "interval-ms",
      "print-accepted", "publishers",
    ]),
    "sub": client.union(["count"]),
  ]
}()

/// Options every command takes.
let globalOptions: Set<String> = ["tcti", "verbose", "help", "config"]

/// `edgekey COMMAND --help`: that command's lines of the usage, then the options and exit codes.
func commandUsage(_ command: String) -> String {
  let lines = usage.split(separator: "\n", omittingEmptySubsequences: false)
  var section: [Substring] = []
  var inside = false
  for line in lines {
    if line.hasPrefix("  edgekey ") {
      inside = line.hasPrefix("  edgekey \(command) ") || line == "  edgekey \(command)"
    } else if line.isEmpty {
      inside = false
    }
    if inside { section.append(line) }
  }
  guard !section.isEmpty, let options = usage.firstRange(of: "\nOptions:") else { return usage }
  return "Usage:\n" + section.joined(separator: "\n") + "\n" + usage[options.lowerBound...]
}

/// `-a/--algorithm A`, P-256 by default.
func algorithmOption(_ args: Arguments) -> KeyAlgorithm {
  guard let text = args.option("algorithm") else { return .eccP256 }
  guard let algorithm = KeyAlgorithm(rawValue: text) else {
    fail("unknown algorithm \(text); one of \(KeyAlgorithm.allCases.map(\.rawValue).joined(separator: ", "))", .usage)
  }
  return algorithm
}

/// RSA keys take seconds on a real TPM: say so on stderr before the wait.
func announceSlowKey(_ algorithm: KeyAlgorithm) {
  guard !algorithm.isECC else { return }
  var note = "edgekey: creating \(algorithm) in the TPM (up to several seconds on real chips)...\n"
  note.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

func fail(_ message: String, _ code: ExitCode) -> Never {
  var text = "edgekey: \(message)\n"
  text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
  exit(code.rawValue)
}

func out(_ text: String) {
  print(text)
}

/// A line on stderr, whatever the log level: what an operator must see (journald keeps it).
func warn(_ text: String) {
  var line = "edgekey: \(text)\n"
  line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

func jsonString(_ s: String) -> String { JSON.string(s) }

func authValue(_ args: Arguments) -> [UInt8] {
  guard let variable = args.option("auth-env") else { return [] }
  guard let value = getenv(variable) else { fail("environment variable \(variable) is not set", .usage) }
  return Array(String(cString: value).utf8)
}

func openTPM(_ args: Arguments, logger: Logger) -> TPM {
  do {
    return try TPM.open(tcti: args.option("tcti"), logger: logger)
  } catch {
    fail(error.description, error.code == .unreachable ? .tpmUnreachable : .failure)
  }
}

func handleOption(_ args: Arguments) -> PersistentHandle? {
  guard let text = args.option("handle") else { return nil }
  guard let handle = PersistentHandle(text) else {
    fail("\(text) is not a persistent handle (0x81000000-0x81ffffff)", .usage)
  }
  return handle
}

func describe(_ key: PublicKey, storage: String, json: Bool) {
  if json {
    out(
      "{\"algorithm\":\(jsonString(key.algorithm?.rawValue ?? "unknown")),\"storage\":\(jsonString(storage)),"
        + "\"fingerprint\":\(jsonString("sha256:" + key.fingerprint)),\"attributes\":\(jsonString(key.attributes.description)),"
        + "\"nonExportable\":\(key.attributes.isNonExportable),\"publicKey\":\(jsonString(key.pem))}")
  } else {
    out("algorithm:    \(key.algorithm?.rawValue ?? "unknown")")
    out("storage:      \(storage)")
    out("fingerprint:  sha256:\(key.fingerprint)")
    out("attributes:   \(key.attributes)")
    out("exportable:   \(key.attributes.isNonExportable ? "no (the private key cannot leave this TPM)" : "YES")")
    out(key.pem, terminator: "")
  }
}

func out(_ text: String, terminator: String) { print(text, terminator: terminator) }

func run(_ argv: [[UInt8]]) throws {
  let args: Arguments
  let booleans: Set<String> = [
    "json", "verbose", "help", "stdin-line", "stdin-file", "print-accepted", "retain", "force", "keep-key",
    "channel-binding", "attest", "will-retain", "disable-clean-session", "allow-missing-crl",
    "allow-server-without-eku",
  ]
  let expanded: [[UInt8]]
  do { expanded = try Arguments.expandingConfig(argv, booleans: booleans, known: longOptions) } catch {
    fail(error.description, .usage)  // names the file and line; the whole usage would bury it
  }
  do {
    args = try Arguments(
      expanded,
      booleans: booleans,
      aliases: [
        "-a": "--algorithm", "-o": "--out", "-c": "--handle", "-v": "--verbose", "-h": "--host", "-p": "--port",
        "-t": "--topic", "-m": "--message", "-q": "--qos", "-l": "--stdin-line", "-r": "--retain", "-i": "--id",
        "-f": "--file-message", "-s": "--stdin-file", "-V": "--protocol-version",
        "-x": "--session-expiry-interval",
      ])
  } catch {
    fail("\(error)\n\(usage)", .usage)
  }
  if args.flag("help") || args.words.isEmpty {
    print(args.words.isEmpty ? usage : commandUsage(args.words.joined(separator: " ")), terminator: "")
    exit(args.words.isEmpty && !args.flag("help") ? ExitCode.usage.rawValue : 0)
  }
  let logger =
    args.flag("verbose") ? Logger(label: "edgekey", level: .debug, handler: StandardErrorLogHandler()) : .disabled
  let command = args.words.joined(separator: " ")
  if let allowed = commandOptions[command] {
    let stray = args.optionNames.filter { !allowed.contains($0) && !globalOptions.contains($0) }.sorted()
    if let first = stray.first {
      fail("--\(first) is not an option of `edgekey \(command)` (edgekey \(command) --help)", .usage)
    }
  }
  // The commands that live in files of their own.
  let handlers: [String: (Arguments, Logger) throws -> Void] = [
    "csr": csrCommand, "enroll": enrollCommand, "renew": renewCommand, "agent": agentCommand,
    "provision": provisionCommand, "status": statusCommand, "doctor": doctorCommand, "pub": pubCommand,
    "sub": subCommand,
  ]
  if let handler = handlers[command] {
    try handler(args, logger)
    return
  }
  switch command {
  case "tpm info":
    let tpm = openTPM(args, logger: logger)
    let info = try tpm.info()
    let endorsement = EndorsementReport.read(tpm)
    // With --state, the device's attestation key: made, certified by the RA, until when.
    let attestation = args.option("state").flatMap { try? CredentialStore(directory: $0) }.map {
      AttestationStatus.read($0)
    }
    let attestationField: String = attestation.map { "\"attestation\":\(attestationJSON($0))," } ?? ""
    if args.flag("json") {
      out(
        "{\"tcti\":\(jsonString(info.tcti)),\"resourceManager\":\(info.hasResourceManager),"
          + "\"manufacturer\":\(jsonString(info.manufacturer)),\"vendor\":\(jsonString(info.vendor)),"
          + "\"firmware\":\(jsonString(info.firmwareVersion)),\"specRevision\":\(jsonString(info.specRevision)),"
          + "\"algorithms\":[\(info.algorithms.map(jsonString).joined(separator: ","))],"
          + "\"curves\":[\(info.curves.map(jsonString).joined(separator: ","))],"
          + "\"supportedKeys\":[\(info.supportedKeys.map { jsonString($0.rawValue) }.joined(separator: ","))],"
          + "\"inLockout\":\(info.inLockout),\"lockoutCounter\":\(info.lockoutCounter),\"maxAuthFail\":\(info.maxAuthFail),"
          + "\"transientSlots\":\(info.transientSlots),\"ekCertificates\":\(info.endorsementCertificates.count),"
          + "\"endorsementKeys\":[\(endorsement.map(\.json).joined(separator: ","))],"
          + attestationField
          + "\"persistentHandles\":[\(info.persistentHandles.map { jsonString($0.description) }.joined(separator: ","))]}"
      )
    } else {
      out("TCTI:              \(info.tcti)\(info.hasResourceManager ? "" : " (no resource manager)")")
      out("manufacturer:      \(info.manufacturer)  \(info.vendor)")
      out("firmware:          \(info.firmwareVersion)  (TPM 2.0 revision \(info.specRevision))")
      out("key types:         \(info.supportedKeys.map(\.rawValue).joined(separator: ", "))")
      out("curves:            \(info.curves.joined(separator: ", "))")
      out("algorithms:        \(info.algorithms.joined(separator: ", "))")
      out(
        "lockout:           \(info.inLockout ? "IN LOCKOUT" : "not in lockout") (\(info.lockoutCounter)/\(info.maxAuthFail) failures, interval \(info.lockoutInterval.secondsText))"
      )
      out("transient slots:   \(info.transientSlots)")
      out(
        "EK certificates:   \(info.endorsementCertificates.isEmpty ? "none" : info.endorsementCertificates.map { "0x" + String($0, radix: 16) }.joined(separator: ", "))"
      )
      for report in endorsement { out("endorsement key:   \(report.text)") }
      if let attestation {
        let detail = attestation.certificate.map { ": \($0.subject) from \($0.issuer), until \($0.notAfter)" } ?? ""
        out("attestation key:   \(attestation.state)\(detail)")
      } else {
        out("attestation key:   (--state DIR shows the device's)")
      }
      out(
        "persistent:        \(info.persistentHandles.isEmpty ? "none" : info.persistentHandles.map(\.description).joined(separator: ", "))"
      )
    }

  case "key create":
    let algorithm = algorithmOption(args)
    let path = args.option("out")
    let handle = handleOption(args)
    guard (path == nil) != (handle == nil) else {
      fail("key create needs exactly one of --out FILE or --handle H", .usage)
    }
    let tpm = openTPM(args, logger: logger)
    announceSlowKey(algorithm)
    let file = try tpm.createKey(algorithm, authValue: authValue(args))
    if let path {
      try file.write(to: path)
      describe(try file.publicKey(), storage: "file \(path)", json: args.flag("json"))
    } else if let handle {
      try tpm.persist(file, at: handle)
      describe(try file.publicKey(), storage: "persistent \(handle)", json: args.flag("json"))
    }

  case "key show":
    if let path = args.option("file") {
      let file = try TSS2PrivateKey(contentsOf: path)
      describe(
        try file.publicKey(), storage: "file \(path) (parent 0x\(String(file.parent, radix: 16)))",
        json: args.flag("json"))
    } else if let handle = handleOption(args) {
      let key = try openTPM(args, logger: logger).loadKey(at: handle)
      describe(key.publicKey, storage: "persistent \(handle)", json: args.flag("json"))
    } else {
      fail("key show needs --file FILE or --handle H", .usage)
    }

  case "key list":
    let tpm = openTPM(args, logger: logger)
    for handle in try tpm.persistentHandles() {
      if handle == .storageRootKey {
        out("\(handle)  storage root key")
        continue
      }
      if let key = try? tpm.loadKey(at: handle) {
        out("\(handle)  \(key.algorithm?.rawValue ?? "other")  sha256:\(key.publicKey.fingerprint)")
      } else {
        out("\(handle)  (not a signing key)")
      }
    }

  case "key delete":
    if let path = args.option("file") {
      _ = try TSS2PrivateKey(contentsOf: path)  // refuse to delete something that is not a key file
      guard unlink(path) == 0 else { fail("cannot remove \(path): \(String(cString: strerror(errno)))", .failure) }
      out("removed \(path)")
    } else if let handle = handleOption(args) {
      try openTPM(args, logger: logger).evict(handle)
      out("evicted \(handle)")
    } else {
      fail("key delete needs --file FILE or --handle H", .usage)
    }

  case "srk persist":
    let created = try openTPM(args, logger: logger).persistStorageRootKey()
    out(created ? "persisted the storage root key at 0x81000001" : "the storage root key is already at 0x81000001")

  default:
    fail("unknown command '\(command)'\n\(usage)", .usage)
  }
}

// The library keeps tpm2-tss quiet (its errors say the same as ours, typed); -v shows them.
if CommandLine.arguments.contains("-v") || CommandLine.arguments.contains("--verbose") {
  setenv("TSS2_LOG", "all+warning", 0)
}

do {
  try run(Arguments.processArguments)
} catch let error as TPMError {
  fail(error.description, error.code == .unreachable ? .tpmUnreachable : .failure)
} catch let error as TLSError {
  fail(error.description, .failure)
} catch {
  fail("\(error)", .failure)
}
