// A telemetry daemon in a screen of code: its identity from the credential store (the TPM key
// never leaves the TPM), MQTT with a durable outbox, the renewal agent switching the connection
// to each new certificate, and counters. Stop it with SIGTERM or Ctrl-C.
//
//   edgekey-telemetry STATE_DIR EST_URL CA.pem BROKER_HOST BROKER_PORT
//   (EDGEKEY_TCTI picks the TPM; `edgekey enroll` or `provision` fills STATE_DIR first)
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import Foundation

/// A line on stdout, written at once (a log file or journald reads it while we run).
func say(_ text: String) { FileHandle.standardOutput.write(Data((text + "\n").utf8)) }

let args = CommandLine.arguments
guard args.count == 6, let port = UInt16(args[5]) else {
  say("usage: edgekey-telemetry STATE_DIR EST_URL CA.pem BROKER_HOST BROKER_PORT")
  exit(2)
}
let (stateDir, estURL, caFile, brokerHost) = (args[1], args[2], args[3], args[4])
var signals = sigset_t()
sigemptyset(&signals)
sigaddset(&signals, SIGTERM)
sigaddset(&signals, SIGINT)
pthread_sigmask(SIG_BLOCK, &signals, nil)

do {
  let caPEM = try String(contentsOfFile: caFile, encoding: .utf8)
  let tpm = try TPM.open()
  let store = try CredentialStore(directory: stateDir)
  let settings = EnrollmentSettings(server: try ESTServer(url: estURL), trustAnchors: try Certificate.chain(pem: caPEM))
  let tlsPolicy = TLSPolicy(trustAnchorsPEM: caPEM, serverName: brokerHost)
  let switcher = MQTTCredentialSwitch(policy: tlsPolicy)
  let agent = RenewalAgent(
    store: store, tpm: tpm, settings: settings, onEvent: { say("renewal: \($0)") }, install: switcher.install)

  guard let (credential, key) = try agent.current(), let cert = credential.certificate else {
    say("\(stateDir) holds no credential: run `edgekey enroll` or `edgekey provision` first")
    exit(1)
  }
  let device = cert.commonName ?? "device"
  let client = try MQTTClient(
    MQTTConfiguration(host: brokerHost, port: port, clientID: device),
    tls: try TLSClientContext(certificateChain: credential.chain, key: key, policy: tlsPolicy),
    outbox: try Outbox(path: stateDir + "/outbox.db"))
  switcher.attach(client, agent: agent)
  client.start()
  agent.start()
  say("\(device) → \(brokerHost):\(port), certificate until \(cert.notAfter)")

  var reading = 0
  let every = Int(ProcessInfo.processInfo.environment["INTERVAL"] ?? "5") ?? 5
  var timeout = timespec(tv_sec: every, tv_nsec: 0)
  while sigtimedwait(&signals, nil, &timeout) < 0 {  // a reading every $INTERVAL (5) s until a signal
    let payload = "{\"reading\":\(reading),\"load\":\(ProcessInfo.processInfo.systemUptime)}"
    try client.enqueue([
      MQTTMessage(topic: "devices/\(device)/telemetry", payload: Array(payload.utf8), qos: .atLeastOnce)
    ])
    reading += 1
    let m = client.metrics
    say("sent \(m.messagesAcknowledged)/\(m.messagesQueued), renewals \(agent.counters.renewals)")
  }
  agent.stop()
  client.stop()  // what the broker has not acknowledged stays in the outbox for the next start
} catch {
  say("edgekey-telemetry: \(error)")
  exit(1)
}
