// edgekey-bench: full mTLS handshakes per second to mosquitto on loopback, side by side:
// EdgeKey (TPM key on swtpm through the provider), the same client with a software key (the
// floor), and Debian's tpm2-openssl through tpm2-abrmd (the anchor). Each handshake ends with
// MQTT CONNECT/CONNACK, so the broker has verified the client certificate. TPM commands per
// handshake are counted at the TCTI: our counter for EdgeKey, the pcap TCTI for tpm2-openssl.
//
// MQTTBench.swift adds QoS 1 messages/s against a plain libmosquitto publisher, and memory;
// ProvisionBench.swift the time and TPM commands to provision a device against a shell pipeline;
// RegistryBench.swift issuances per second with the RA's device registry against signing alone.
// AttestationBench.swift provisioning and rotation with key attestation against without.
//
//   swift run -c release edgekey-bench [--handshakes N] [--anchor-seconds S] [--messages N]
import COpenSSL
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

struct Options {
  var handshakes = 300
  var anchorSeconds = 5
  var messages = 20000
  var payload = 64
  var devices = 10
  var only: String?
  init(_ args: [String]) {
    var i = 1
    while i < args.count {
      switch args[i] {
      case "--handshakes": i += 1; handshakes = Int(args[i]) ?? handshakes
      case "--anchor-seconds": i += 1; anchorSeconds = Int(args[i]) ?? anchorSeconds
      case "--messages": i += 1; messages = Int(args[i]) ?? messages
      case "--payload": i += 1; payload = Int(args[i]) ?? payload
      case "--devices": i += 1; devices = max(Int(args[i]) ?? devices, 1)
      case "--only": i += 1; only = args[i]
      case "-h", "--help":
        print(
          "usage: edgekey-bench [--handshakes N] [--anchor-seconds S] [--messages N] [--payload BYTES] "
            + "[--devices N] [--only handshakes|mqtt|provision|registry|attestation]")
        exit(0)
      default:
        FileHandle.standardError.write("unknown option \(args[i])\n".data(using: .utf8)!)
        exit(2)
      }
      i += 1
    }
  }
}

struct Row {
  var name: String
  var perSecond: Double
  var commandsPerHandshake: Double?
  var note: String
}

/// MQTT 3.1.1 CONNECT and its CONNACK over an established TLS connection.
func mqttConnect(_ connection: TLSConnection) throws {
  let id = Array("edgekey-bench".utf8)
  let variable: [UInt8] = [0, 4] + Array("MQTT".utf8) + [4, 0x02, 0, 60]
  try connection.write([0x10, UInt8(variable.count + 2 + id.count)] + variable + [0, UInt8(id.count)] + id)
  let connack = try connection.read()
  guard connack == [0x20, 0x02, 0x00, 0x00] else { throw HarnessError("CONNACK refused: \(connack)") }
}

/// A device for the benchmark: swtpm, an ECC P-256 key in it, a certificate from `ca`, and
/// the TLS context for 127.0.0.1. Members are torn down in declaration order: the context and
/// key before the TPM context before swtpm.
final class TPMDevice {
  let context: TLSClientContext
  let key: TPMKey
  let tpm: TPM
  let swtpm: SoftwareTPM

  /// - Parameter tctiPrefix: in front of swtpm's TCTI, e.g. `"delay:100:"` (a real chip's latency).
  /// - Parameter resumesSessions: the context's `TLSPolicy.resumesSessions` (off: every
  ///   connection is a full handshake).
  init(ca: TestCA, commonName: String, tctiPrefix: String = "", resumesSessions: Bool = true) throws {
    swtpm = try SoftwareTPM()
    tpm = try TPM.open(tcti: tctiPrefix + swtpm.tcti)
    key = try tpm.loadKey(try tpm.createKey())
    let cert = try ca.issueClient(publicKeyDER: key.publicKey.spki, commonName: commonName)
    context = try TLSClientContext(
      certificateChain: try Certificate.chain(pem: cert.certificate), key: key,
      policy: TLSPolicy(
        trustAnchorsPEM: ca.certificatePEM, serverName: "127.0.0.1", resumesSessions: resumesSessions))
  }
}

func measure(_ count: Int, _ body: () throws -> Void) rethrows -> Double {
  let start = Date()
  for _ in 0..<count { try body() }
  return Double(count) / Date().timeIntervalSince(start)
}

/// Full handshakes per second reported by `openssl s_time -new`.
func sTimeRate(_ arguments: [String], environment: [String: String]?) throws -> Double {
  let result = try Command.runCapturing("openssl", arguments, environment: environment)
  // "123 connections in 5.01 real seconds, 0 bytes read per connection"
  for line in result.stdout.split(separator: "\n") where line.contains("connections in") && line.contains("real") {
    let words = line.split(separator: " ")
    if let count = Double(words[0]), let i = words.firstIndex(of: "in"), let secs = Double(words[i + 1]), secs > 0 {
      return count / secs
    }
  }
  throw HarnessError("s_time printed no rate: \(result.stdout) \(result.stderr)")
}

func run() throws {
  let options = Options(CommandLine.arguments)
  defer {
    let cores = ProcessInfo.processInfo.activeProcessorCount
    Report.shared.print(machine: "\(cores) cores, swtpm and mosquitto on loopback, one run")
  }
  let work = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-bench-\(getpid())")
  try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
  defer { try? FileManager.default.removeItem(at: work) }

  let ca = try TestCA()
  let serverCert = try ca.issueServer()
  // set_tcp_nodelay: without it Nagle's algorithm on the broker adds ~40 ms to every handshake
  // and hides the client's own cost.
  let broker = try MosquittoBroker(
    certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: ca.certificatePEM,
    extraConfig: ["set_tcp_nodelay true"])
  print("mosquitto with require_certificate on 127.0.0.1:\(broker.port); TLS 1.3; ECDSA P-256 client keys")
  if options.only == nil || options.only == "registry" { try runRegistry(options, ca: ca, work: work) }
  if options.only == "registry" { return }
  if options.only == nil || options.only == "attestation" { try runAttestation(options, work: work) }
  if options.only == "attestation" { return }
  if options.only == nil || options.only == "provision" {
    try runProvisioning(options, ca: ca, broker: broker, work: work)
  }
  if options.only == "provision" { return }
  if options.only != "handshakes" {
    try runMQTT(options, ca: ca, broker: broker, work: work)
    try runReconnects(ca: ca, broker: broker)
  }
  if options.only == "mqtt" { return }
  var rows: [Row] = []

  // EdgeKey: TPM key on swtpm, one TLSClientContext reused for every connection; full
  // handshakes (session resumption off), then resumed ones.
  for resumes in [false, true] {
    let device = try TPMDevice(ca: ca, commonName: "bench-tpm", resumesSessions: resumes)
    let (context, tpm) = (device.context, device.tpm)
    try mqttConnect(try TLSConnection(context: context, host: "127.0.0.1", port: broker.port))  // warm up, load
    let before = tpm.commandCount
    let rate = try measure(options.handshakes) {
      try mqttConnect(try TLSConnection(context: context, host: "127.0.0.1", port: broker.port))
    }
    let commands = Double(tpm.commandCount - before) / Double(options.handshakes)
    rows.append(
      Row(
        name: resumes ? "EdgeKey, TPM key, resumed session" : "EdgeKey, TPM key (swtpm)", perSecond: rate,
        commandsPerHandshake: commands, note: ""))
  }

  // The floor: the same client and policy with a software key.
  do {
    let key = try TestCA.generateKey()
    defer { EVP_PKEY_free(key) }
    var spki: UnsafeMutablePointer<UInt8>?
    let n = i2d_PUBKEY(key, &spki)
    let der = Array(UnsafeBufferPointer(start: spki, count: Int(n)))
    CRYPTO_free(spki, #file, #line)
    let cert = try ca.issueClient(publicKeyDER: der, commonName: "bench-software")
    let context = try TLSClientContext(
      certificateChain: try Certificate.chain(pem: cert.certificate), softwareKey: key,
      policy: TLSPolicy(trustAnchorsPEM: ca.certificatePEM, serverName: "127.0.0.1", resumesSessions: false))
    try mqttConnect(try TLSConnection(context: context, host: "127.0.0.1", port: broker.port))
    let rate = try measure(options.handshakes) {
      try mqttConnect(try TLSConnection(context: context, host: "127.0.0.1", port: broker.port))
    }
    rows.append(Row(name: "software key (same client)", perSecond: rate, commandsPerHandshake: 0, note: ""))
  }

  // The anchor: tpm2-openssl (openssl s_client -provider tpm2) through tpm2-abrmd.
  var anchorNote = ""
  if findExecutable("tpm2-abrmd") != nil,
    FileManager.default.fileExists(atPath: "/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")
  {
    let swtpm = try SoftwareTPM()
    let abrmd = try AccessBroker(over: swtpm)
    let env = abrmd.toolEnvironment
    let keyFile = work.appendingPathComponent("anchor-key.pem").path
    try Command.run(
      "openssl", ["genpkey", "-provider", "tpm2", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", keyFile],
      environment: env)
    let pubPEM = try Command.run(
      "openssl", ["pkey", "-provider", "tpm2", "-provider", "default", "-in", keyFile, "-pubout"], environment: env)
    guard let pubDER = PEM.decode(pubPEM, label: "PUBLIC KEY") else { throw HarnessError("no public key") }
    let cert = try ca.issueClient(publicKeyDER: pubDER, commonName: "bench-tpm2-openssl")
    let certFile = work.appendingPathComponent("anchor-cert.pem")
    let caFile = work.appendingPathComponent("ca.pem")
    try cert.certificate.write(to: certFile, atomically: true, encoding: .utf8)
    try ca.certificatePEM.write(to: caFile, atomically: true, encoding: .utf8)
    // openssl s_time: repeated full handshakes in one process (no process start per handshake).
    let seconds = String(options.anchorSeconds)
    let timeArgs: [String] = [
      "s_time", "-connect", "127.0.0.1:\(broker.port)", "-new", "-time", seconds, "-CAfile", caFile.path,
      "-verify", "4", "-cert", certFile.path,
    ]
    let tpmArgs = timeArgs + ["-provider", "tpm2", "-provider", "default", "-key", keyFile]
    // TPM commands of one handshake, recorded by the pcap TCTI inside s_client.
    let pcap = work.appendingPathComponent("anchor.pcap")
    var pcapEnv = env
    pcapEnv["TPM2OPENSSL_TCTI"] = "pcap:" + abrmd.tcti
    pcapEnv["TCTI_PCAP_FILE"] = pcap.path
    let startup = try Command.runCapturing(
      "openssl", ["pkey", "-provider", "tpm2", "-provider", "default", "-in", keyFile, "-noout"], environment: pcapEnv)
    guard startup.status == 0 else { throw HarnessError("tpm2-openssl cannot load its key: \(startup.stderr)") }
    let loadOnly = try PcapRecord.commands(in: pcap).count
    try? FileManager.default.removeItem(at: pcap)
    let one = try Command.runCapturing(
      "openssl",
      [
        "s_client", "-connect", "127.0.0.1:\(broker.port)", "-CAfile", caFile.path, "-verify_return_error",
        "-cert", certFile.path, "-brief", "-provider", "tpm2", "-provider", "default", "-key", keyFile,
      ], environment: pcapEnv, input: Data())
    guard one.status == 0 else { throw HarnessError("tpm2-openssl s_client failed: \(one.stderr)") }
    let perHandshake = try PcapRecord.commands(in: pcap).count - loadOnly
    let anchorRate = try sTimeRate(tpmArgs, environment: env)
    rows.append(
      Row(
        name: "tpm2-openssl 1.1.1 + tpm2-abrmd", perSecond: anchorRate, commandsPerHandshake: Double(perHandshake),
        note: "openssl s_time"))
    // OpenSSL's own client with a software key, measured the same way.
    let softKey = work.appendingPathComponent("soft.key")
    try TestCA.privateKeyPEM(try TestCA.generateKey()).write(to: softKey, atomically: true, encoding: .utf8)
    let softPub = try Command.run("openssl", ["pkey", "-in", softKey.path, "-pubout"])
    let softCert = try ca.issueClient(publicKeyDER: PEM.decode(softPub, label: "PUBLIC KEY")!, commonName: "bench-sc")
    let softCertFile = work.appendingPathComponent("soft-cert.pem")
    try softCert.certificate.write(to: softCertFile, atomically: true, encoding: .utf8)
    var softArgs = timeArgs + ["-key", softKey.path]
    softArgs[softArgs.firstIndex(of: certFile.path)!] = softCertFile.path
    rows.append(
      Row(
        name: "software key, openssl s_time", perSecond: try sTimeRate(softArgs, environment: nil),
        commandsPerHandshake: 0, note: ""))
  } else {
    anchorNote = "tpm2-openssl or tpm2-abrmd not installed: the anchor was not measured"
  }

  let floor = rows.first { $0.name == "software key (same client)" }?.perSecond ?? 0
  let ours = rows.first?.perSecond ?? 0
  print("")
  print("client".padding(toLength: 34, withPad: " ", startingAt: 0) + "handshakes/s   TPM cmds/handshake   vs software")
  for row in rows {
    let commands = row.commandsPerHandshake.map { String(format: "%.2f", $0) } ?? "-"
    print(
      row.name.padding(toLength: 34, withPad: " ", startingAt: 0)
        + String(format: "%10.1f", row.perSecond) + "   " + commands.padding(toLength: 18, withPad: " ", startingAt: 0)
        + " " + String(format: "%5.2f×", floor > 0 ? row.perSecond / floor : 0)
        + (row.note.isEmpty ? "" : "  " + row.note))
  }
  if let anchor = rows.first(where: { $0.name.hasPrefix("tpm2-openssl") }) {
    print(String(format: "EdgeKey / tpm2-openssl: %.0f×", ours / anchor.perSecond))
    Report.shared.add(
      "mTLS handshakes/s, TPM key", ours: ours, anchorName: "tpm2-openssl", anchor: anchor.perSecond, unit: "/s",
      higherIsBetter: true)
    Report.shared.add(
      "TPM commands per handshake", ours: rows.first?.commandsPerHandshake ?? 0, anchorName: "tpm2-openssl",
      anchor: anchor.commandsPerHandshake ?? 0, unit: "", higherIsBetter: false)
  }
  if let resumed = rows.first(where: { $0.name == "EdgeKey, TPM key, resumed session" }) {
    Report.shared.add(
      "mTLS handshakes/s, TPM key: resumed session vs full handshake", ours: resumed.perSecond,
      anchorName: "full handshake", anchor: ours, unit: "/s", higherIsBetter: true)
  }
  Report.shared.add(
    "mTLS handshakes/s, TPM key vs software key", ours: ours, anchorName: "software key", anchor: floor, unit: "/s",
    higherIsBetter: true)
  print(anchorNote)
  print(String(format: "EdgeKey / software key: %.2f× (goal ≥ 0.8×)", floor > 0 ? ours / floor : 0))
}

func runMQTT(_ options: Options, ca: TestCA, broker: MosquittoBroker, work: URL) throws {
  let device = try TPMDevice(ca: ca, commonName: "bench-mqtt")
  let (swtpm, tpm, context) = (device.swtpm, device.tpm, device.context)
  let rows = try mqttThroughput(
    context, broker: broker, work: work, messages: options.messages, payloadSize: options.payload)
  let anchor = rows[0].perSecond
  print("")
  print("QoS 1 publisher (MQTT 5, \(options.payload)-byte payload, TPM key)  messages/s   messages   vs libmosquitto")
  for row in rows {
    print(
      row.name.padding(toLength: 44, withPad: " ", startingAt: 0) + String(format: "%12.0f", row.perSecond)
        + String(format: "%11d", row.messages) + String(format: "   %5.2f×", row.perSecond / anchor))
  }
  print(String(format: "EdgeKey (in-memory outbox) / libmosquitto: %.2f× (goal ≥ 0.9×)", rows[1].perSecond / anchor))
  for row in rows.dropFirst() {
    Report.shared.add(
      "QoS 1 messages/s, \(row.name)", ours: row.perSecond, anchorName: "libmosquitto C", anchor: anchor, unit: "/s",
      higherIsBetter: true)
  }

  // Peak resident memory of a process publishing the same messages: edgekey pub (TPM key)
  // and mosquitto_pub (software key: it cannot use the TPM).
  let binary = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(
    "edgekey"
  ).path
  guard FileManager.default.isExecutableFile(atPath: binary), let mosquittoPub = findExecutable("mosquitto_pub") else {
    print("edgekey or mosquitto_pub not built/installed: memory not measured")
    return
  }
  let keyFile = work.appendingPathComponent("rss.key").path
  let env = swtpm.toolEnvironment.merging(["EDGEKEY_TCTI": swtpm.tcti]) { $1 }
  let (created, _) = try peakMemory(binary, ["key", "create", "--out", keyFile], environment: env)
  guard created == 0 else { throw HarnessError("edgekey key create failed") }
  let rssKey = try TSS2PrivateKey(contentsOf: keyFile)
  let rssPublic = try tpm.loadKey(rssKey).publicKey.spki
  let rssCert = try ca.issueClient(publicKeyDER: rssPublic, commonName: "bench-rss")
  let caFile = work.appendingPathComponent("rss-ca.pem").path
  let certFile = work.appendingPathComponent("rss-cert.pem").path
  try ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
  try rssCert.certificate.write(toFile: certFile, atomically: true, encoding: .utf8)
  let count = String(min(options.messages, 5000))
  let common = ["-h", "127.0.0.1", "-p", String(broker.port), "--cafile", caFile, "-q", "1"]
  let (ourStatus, ours) = try peakMemory(
    binary,
    ["pub"] + common + ["--cert", certFile, "--file", keyFile, "-t", "bench/rss", "--count", count, "--prefix", "x"],
    environment: env)
  let soft = try ca.issueSoftwareClient(commonName: "bench-rss-soft")
  let softKey = work.appendingPathComponent("rss-soft.key").path
  let softCert = work.appendingPathComponent("rss-soft.pem").path
  try TestCA.privateKeyPEM(soft.key).write(toFile: softKey, atomically: true, encoding: .utf8)
  try soft.certificate.write(toFile: softCert, atomically: true, encoding: .utf8)
  EVP_PKEY_free(soft.key)
  let (theirStatus, theirs) = try peakMemory(
    mosquittoPub,
    common + ["--cert", softCert, "--key", softKey, "-t", "bench/rss", "-m", "x0", "--repeat", count],
    environment: ProcessInfo.processInfo.environment)
  // The example daemon on the facade (Examples/TelemetryDaemon): its credential in a state
  // directory, connected, a reading a second and a command subscription, for 5 s.
  let daemon = URL(fileURLWithPath: binary).deletingLastPathComponent().appendingPathComponent("edgekey-telemetry").path
  var daemonPeak: Int? = nil
  if FileManager.default.isExecutableFile(atPath: daemon) {
    let state = work.appendingPathComponent("daemon-state").path
    let store = try CredentialStore(directory: state)
    try store.write(Credential(key: rssKey, chain: try Certificate.chain(pem: rssCert.certificate)), to: .current)
    let config = work.appendingPathComponent("daemon.conf").path
    try [
      "state = \(state)", "server = https://127.0.0.1:1", "cafile = \(caFile)", "host = 127.0.0.1",
      "port = \(broker.port)", "tcti = \(swtpm.tcti)",
    ].joined(separator: "\n").write(toFile: config, atomically: true, encoding: .utf8)
    let (_, peak) = try peakMemory(
      daemon, [config], environment: env.merging(["INTERVAL": "1"]) { $1 }, stopAfter: .seconds(5))
    daemonPeak = peak
  }
  print("")
  print("peak resident memory, publishing \(count) QoS 1 messages")
  print("  edgekey pub (TPM key)          \(ours) KiB" + (ourStatus == 0 ? "" : " (exit \(ourStatus))"))
  print("  mosquitto_pub (software key)   \(theirs) KiB" + (theirStatus == 0 ? "" : " (exit \(theirStatus))"))
  print(String(format: "  edgekey / mosquitto_pub: %.2f×", Double(ours) / Double(max(theirs, 1))))
  Report.shared.add(
    "peak RSS publishing \(count) QoS 1 messages", ours: Double(ours), anchorName: "mosquitto_pub",
    anchor: Double(theirs), unit: "KiB", higherIsBetter: false)
  if let daemonPeak {
    print("  edgekey-telemetry (the facade's example daemon, 5 s connected)   \(daemonPeak) KiB")
    Report.shared.add(
      "peak RSS, example daemon on the facade (5 s connected)", ours: Double(daemonPeak), anchorName: "edgekey pub",
      anchor: Double(ours), unit: "KiB", higherIsBetter: false)
  }
}

do {
  try run()
} catch {
  FileHandle.standardError.write("edgekey-bench: \(error)\n".data(using: .utf8)!)
  exit(1)
}
