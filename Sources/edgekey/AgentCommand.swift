import EdgeKey
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// What `edgekey agent` writes to `status.json` in the state directory (and `status` reads).
final class AgentStatus: @unchecked Sendable {
  private let lock = Lock()
  private let path: String
  /// The broker this agent talks to, "host:port".
  var broker = ""
  private var lastEvent = ""
  /// The last error of each layer, with its time: kept after later successes, so that an
  /// operator sees what happened during an outage that is over.
  private var errors: [String: (time: Date, text: String)] = [:]

  init(directory: String) { path = directory + "/status.json" }

  func event(_ e: RenewalEvent) {
    lock.lock()
    defer { lock.unlock() }
    lastEvent = e.description
    switch e {
    case .failed(let error, _):
      let layer: String
      switch error.kind {
      case .tpm: layer = "tpm"
      case .clock: layer = "clock"
      case .credentialLost: layer = "credential"
      case .storage: layer = "storage"
      case .tls where error.tls?.layer == .tpm: layer = "tpm"
      default: layer = "enrollment"
      }
      errors[layer] = (Date(), error.description)
    case .credentialLost(let slot, let reason):
      errors["credential"] = (Date(), "the \(slot) key can no longer be loaded by this TPM: \(reason)")
    case .clockRefused(let why):
      errors["clock"] = (Date(), why)
    default: break
    }
  }

  func write(agent: RenewalAgent, client: MQTTClient?, state: String) {
    lock.lock()
    if let failure = client?.lastFailure {
      let layer = failure.layer == "TPM" ? "tpm" : "broker"
      if errors[layer].map({ $0.time < failure.time }) ?? true {
        errors[layer] = (failure.time, "\(failure.layer): \(failure.description)")
      }
    }
    let event = lastEvent
    let latest = errors.values.max { $0.time < $1.time }
    let errorsJSON =
      "{"
      + errors.sorted { $0.key < $1.key }.map {
        "\(jsonString($0.key)):{\"time\":\(jsonString(Certificate.format($0.value.time))),\"error\":\(jsonString($0.value.text))}"
      }.joined(separator: ",") + "}"
    lock.unlock()
    let error = latest?.text ?? ""
    let c = agent.counters
    let m = client?.metrics ?? MQTTMetrics()
    let renewal =
      "{\"attempts\":\(c.attempts),\"renewals\":\(c.renewals),\"failures\":\(c.failures),"
      + "\"bootstrapFallbacks\":\(c.bootstrapFallbacks),\"keysCreated\":\(c.keysCreated),"
      + "\"keysRetired\":\(c.keysRetired),\"anchorsAdded\":\(c.anchorsAdded),"
      + "\"anchorsRemoved\":\(c.anchorsRemoved),\"clockRefusals\":\(c.clockRefusals),"
      + "\"credentialsLost\":\(c.credentialsLost)}"
    let mqtt =
      "{\"connected\":\(client?.isConnected ?? false),\"connections\":\(m.connections),"
      + "\"messagesQueued\":\(m.messagesQueued),\"messagesAcknowledged\":\(m.messagesAcknowledged),"
      + "\"messagesDropped\":\(m.messagesDroppedTotal),\"outboxMessages\":\(m.outboxMessages),"
      + "\"credentialSwaps\":\(m.credentialSwaps),\"disconnections\":\(m.disconnections)}"
    let text =
      "{\"time\":\(jsonString(Certificate.format(Date()))),\"pid\":\(getpid()),\"state\":\(jsonString(state)),"
      + "\"broker\":\(jsonString(broker)),"
      + "\"renewal\":\(renewal),\"mqtt\":\(mqtt),\"lastEvent\":\(jsonString(event)),"
      + "\"lastError\":\(jsonString(error)),\"lastErrorTime\":\(jsonString(latest.map { Certificate.format($0.time) } ?? "")),"
      + "\"errors\":\(errorsJSON)}\n"
    try? AtomicFile.write(Array(text.utf8), to: path, mode: 0o600)
  }
}

/// `edgekey agent`: the long-running device. Enrolls if it has to, keeps the MQTT connection,
/// publishes telemetry, renews its certificate at the policy's moment and switches the
/// connection to it; SIGTERM/SIGINT stop it cleanly, SIGHUP reloads (re-reads the stored
/// credential, and renews now if it is due).
func agentCommand(_ args: Arguments, logger: Logger) throws {
  // The stop and reload signals go to sigtimedwait below, never to a default handler.
  var signals = sigset_t()
  sigemptyset(&signals)
  for s in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&signals, s) }
  pthread_sigmask(SIG_BLOCK, &signals, nil)

  let (store, settings) = enrollmentSettings(args, logger: logger)
  guard let host = args.option("host"), let port = UInt16(args.option("port") ?? "8883") else {
    fail("agent needs -h/--host H (the broker; -p/--port P, default 8883)", .usage)
  }
  let tlsPolicy = brokerPolicy(args, host: host, caFile: args.option("broker-cafile") ?? args.option("cafile")!)
  var policy = RenewalPolicy()
  // Activate an attestation key at the first enrollment if the device has none; once it has
  // one, every renewal is attested whatever this says.
  policy.attest = args.flag("attest")
  if let text = args.option("renew-at") {
    guard let share = Double(text), share > 0, share < 1 else { fail("--renew-at takes a share like 0.75", .usage) }
    // The end of the renewal window; the window keeps its width, within the lifetime.
    policy.renewAfter = share
    policy.jitter = min(policy.jitter, share / 2)
  }
  let interval = Double(args.option("interval") ?? "0") ?? 0
  let topic = args.option("topic")
  if interval > 0 && topic == nil { fail("--interval needs -t/--topic", .usage) }
  if args.flag("stdin-line") && topic == nil { fail("-l/--stdin-line needs -t/--topic", .usage) }
  if let topic {
    do { try MQTTTopic.checkName(topic) } catch { fail("-t/--topic: \(error.reason)", .usage) }
  }
  let identity = identityOption(args)

  // One agent per state directory: a second one would renew over the first and evict its keys.
  let lock: StateLock
  do { lock = try StateLock(store) } catch { fail(error.message, .failure) }
  defer { withExtendedLifetime(lock) {} }
  let tpm = openTPM(args, logger: logger)
  let status = AgentStatus(directory: store.directory)
  status.broker = "\(host):\(port)"
  let switcher = MQTTCredentialSwitch(policy: tlsPolicy, logger: logger)
  let agent = RenewalAgent(
    store: store, tpm: tpm, settings: settings, policy: policy, identity: identity,
    onEvent: { event in
      logger.info("\(event)")
      status.event(event)
      // What an operator must see without -v (journald keeps stderr).
      switch event {
      case .credentialLost, .bootstrapFallback, .clockRefused, .failed:
        warn("agent: \(event)")
      default: break
      }
    },
    install: switcher.install)

  /// Waits up to `seconds` for a signal; returns it, or 0.
  func waitForSignal(_ seconds: Double) -> Int32 {
    var timeout = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
    let s = sigtimedwait(&signals, nil, &timeout)
    return s > 0 ? s : 0
  }

  // Not enrolled yet (a device fresh from the factory), the stored certificate expired (off for
  // too long), or its key lost (a TPM cleared or replaced): the agent's thread enrolls, with its
  // back-off, while this one listens for SIGTERM, which cuts an attempt short (an EST transfer
  // or a long Retry-After) within a second.
  let enrolled = try agent.hasWorkingCredential()
  agent.start()
  if !enrolled {
    let before = agent.counters.renewals
    status.write(agent: agent, client: nil, state: "enrolling")
    while agent.counters.renewals == before {
      if let error = agent.lastError, error.kind == .credentialLost {
        // No way to enroll a new key: retrying cannot help.
        agent.stop()
        status.write(agent: agent, client: nil, state: "stopped")
        fail("\(error)", .failure)
      }
      let s = waitForSignal(0.2)
      if s == SIGTERM || s == SIGINT {
        agent.stop()
        status.write(agent: agent, client: nil, state: "stopped")
        return
      }
      status.write(agent: agent, client: nil, state: "enrolling")
    }
  }
  guard let (credential, key) = try agent.current() else { return }

  var configuration = MQTTConfiguration(
    host: host, port: port, clientID: args.option("id") ?? credential.certificate?.commonName)
  applyMQTTOptions(args, to: &configuration)
  let outbox = try args.option("outbox").map { try Outbox(path: $0) }
  let client = try MQTTClient(
    configuration, tls: try TLSClientContext(certificateChain: credential.chain, key: key, policy: tlsPolicy),
    outbox: outbox, logger: logger)
  switcher.attach(client, agent: agent)
  client.start()
  if let cache = revocationListCache(args, trustPEM: tlsPolicy.trustAnchorsPEM) {
    refreshRevocationLists(
      cache, fileCRL: args.option("crl").map(readText), switcher: switcher, agent: agent, logger: logger)
  }
  out(
    "agent: \(credential.certificate?.subject ?? "?") → \(host):\(port); certificate until "
      + "\(credential.certificate.map { Certificate.format($0.notAfter) } ?? "?"), state in \(store.directory)")
  fflush(nil)

  // Telemetry: a line read from stdin per message (-l), and/or a heartbeat every --interval s.
  if let topic, args.flag("stdin-line") {
    Threads.detach(name: "edgekey-stdin") {
      let lines = LineReader()
      while let line = lines.next() {
        do { try client.enqueue([MQTTMessage(topic: topic, payload: line, qos: .atLeastOnce)]) } catch {
          logger.warning("a line was not accepted: \(error)")
        }
      }
    }
  }
  // Monotonic: an NTP step neither bunches nor stops the heartbeats.
  let clock = ContinuousClock()
  let started = clock.now
  let never = started.advanced(by: .seconds(100 * 365 * 86400))
  var nextBeat = interval > 0 ? started : never
  var ready = false
  var sequence = 0
  while true {
    if !ready && client.isConnected {
      ready = true
      Systemd.notify("READY=1\nSTATUS=connected to \(host):\(port)")
    }
    if let topic, clock.now >= nextBeat {
      let cert = (try? store.read(.current))?.certificate
      let beat =
        "{\"seq\":\(sequence),\"uptime\":\((clock.now - started).components.seconds),"
        + "\"certificateNotAfter\":\(jsonString(cert.map { Certificate.format($0.notAfter) } ?? ""))}"
      do { try client.enqueue([MQTTMessage(topic: topic, payload: Array(beat.utf8), qos: .atLeastOnce)]) } catch {
        logger.warning("a heartbeat was not accepted: \(error)")
      }
      sequence += 1
      nextBeat = clock.now.advanced(by: .seconds(interval))
    }
    status.write(agent: agent, client: client, state: client.isConnected ? "connected" : "connecting")
    let s = waitForSignal(min(1, max((nextBeat - clock.now).seconds, 0.05)))
    if s == SIGTERM || s == SIGINT { break }
    if s == SIGHUP {
      // Reload: a credential another command stored (edgekey renew), and a renewal if due.
      logger.info("SIGHUP: reloading the stored credential")
      if let (stored, storedKey) = try? agent.current(),
        stored.certificate?.der != client.tls.certificateChain.first?.der
      {
        switcher.install(stored, storedKey)
      }
      agent.renewSoon()
    }
  }
  Systemd.notify("STOPPING=1")
  agent.stop()
  // Messages accepted but not yet acknowledged stay in the outbox (on disk with --outbox).
  client.stop()
  status.write(agent: agent, client: client, state: "stopped")
  out(
    "agent stopped: \(agent.counters.renewals) renewal(s), \(client.metrics.messagesAcknowledged) message(s) delivered")
}

/// Keeps the CRLs the agent checks with current: at half of each CRL's validity (or within a
/// minute of a failed fetch) a new one is fetched; when it differs, the broker's next connection
/// and the next renewal use it. The connection in place is not dropped.
func refreshRevocationLists(
  _ cache: RevocationListCache, fileCRL: String?, switcher: MQTTCredentialSwitch, agent: RenewalAgent, logger: Logger
) {
  Threads.detach(name: "edgekey-crl") {
    var last = (try? cache.current())?.der
    while true {
      Threads.sleep(max(1, min(60, cache.refreshDate.timeIntervalSinceNow)))
      guard let crl = try? cache.current(), crl.der != last else {
        if let error = cache.lastError { logger.warning("CRL: \(error)") }
        continue
      }
      last = crl.der
      let pem = (fileCRL ?? "") + crl.pem
      var policy = switcher.policy
      policy.crlPEM = pem
      switcher.update(policy: policy, current: try? agent.current())
      agent.useRevocationLists(pem)
      logger.info(
        "CRL \(crl.number.map(String.init) ?? "-") from \(cache.url): \(crl.revokedSerials.count) revoked, next update \(crl.nextUpdate.map(Timestamp.iso8601) ?? "-")"
      )
    }
  }
}

/// `edgekey status --state DIR [--json]`: the stored credential, when it will be renewed, and
/// what the agent last reported.
func statusCommand(_ args: Arguments, logger: Logger) throws {
  guard let state = args.option("state") else { fail("status needs --state DIR", .usage) }
  let store = try CredentialStore(directory: state)
  guard let current = try store.read(.current), let cert = current.certificate else {
    fail("\(store.path(.current)) holds no credential: not enrolled", .failure)
  }
  let renewAt = RenewalPolicy().renewalDate(for: cert)
  let keyFingerprint = (try? current.key.publicKey().fingerprint) ?? ""
  let agentText = (try? AtomicFile.read(store.directory + "/status.json", limit: 1 << 16)).map {
    String(decoding: $0, as: UTF8.self).trimmingWhitespace()
  }
  let pending = (try? store.read(.next)) != nil
  let previous = (try? store.read(.previous)) != nil
  let anchors = (try? store.anchors().map(\.subject)) ?? []
  if args.flag("json") {
    out(
      "{\"subject\":\(jsonString(cert.subject)),\"issuer\":\(jsonString(cert.issuer)),"
        + "\"serial\":\(jsonString(cert.serialNumber)),\"notBefore\":\(jsonString(Certificate.format(cert.notBefore))),"
        + "\"notAfter\":\(jsonString(Certificate.format(cert.notAfter))),\"renewAt\":\(jsonString(Certificate.format(renewAt))),"
        + "\"valid\":\(cert.isValid()),\"keyFingerprint\":\(jsonString("sha256:" + keyFingerprint)),"
        + "\"renewalPending\":\(pending),\"previousKept\":\(previous),"
        + "\"anchors\":[\(anchors.map(jsonString).joined(separator: ","))],"
        + "\"attestation\":\(attestationJSON(AttestationStatus.read(store))),"
        + "\"agent\":\(agentText.map(escapingControlCharacters) ?? "null")}")
    return
  }
  let left = cert.notAfter.timeIntervalSinceNow
  out("certificate:  \(cert.subject)  (issuer \(cert.issuer), serial \(cert.serialNumber))")
  out(
    "valid:        \(Certificate.format(cert.notBefore)) to \(Certificate.format(cert.notAfter))"
      + (left > 0 ? " (\(Text.fixed(left)) s left)" : " (EXPIRED)"))
  out("renewal:      at \(Certificate.format(renewAt))\(pending ? "; a renewal is under way" : "")")
  out("key:          sha256:\(keyFingerprint) (in the TPM; \(store.path(.current)))")
  out("anchors:      \(anchors.isEmpty ? "none learnt yet" : anchors.joined(separator: ", "))")
  let attestation = AttestationStatus.read(store)
  out(
    "attestation:  \(attestation.state)"
      + (attestation.certificate.map { " (AK certificate from \($0.issuer), until \($0.notAfter))" } ?? ""))
  // The file is ours, but text from it reaches a terminal: control characters are shown escaped.
  if let agentText {
    out("agent:        \(escapingControlCharacters(agentText))")
  } else {
    out("agent:        no status.json (not running here)")
  }
}

/// `text` with every control character (C0, DEL, C1) written as `\u00XX`, so that what a file
/// says cannot move a terminal's cursor, change its colours or end a line.
func escapingControlCharacters(_ text: String) -> String {
  var out = ""
  for scalar in text.unicodeScalars {
    let v = scalar.value
    if v < 0x20 || v == 0x7F || (0x80...0x9F).contains(v) {
      out += "\\u" + String(repeating: "0", count: 4 - String(v, radix: 16).count) + String(v, radix: 16)
    } else {
      out.unicodeScalars.append(scalar)
    }
  }
  return out
}
