// Provisioning one device, end to end: a key created in the TPM, a CSR signed by it, EST
// enrollment at the project's RA, the credential stored, and the first MQTT connection with it
// (CONNECT/CONNACK, so the broker verified the new certificate). Side by side with the shell
// pipeline a user would write instead: tpm2-openssl's `openssl genpkey` and `openssl req`, curl,
// `openssl pkcs7`, `openssl s_client` (mosquitto_pub cannot use a tpm2-openssl 1.1.1 key:
// "missing private key"). Both reach swtpm through the same tpm2-abrmd; EdgeKey is also timed
// on swtpm directly, its embedded default. TPM commands per device: our TCTI counter, and the
// pcap TCTI inside each openssl process of the pipeline.
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// The user's pipeline, one device per run: $1 work dir, $2 CA file, $3 EST URL, $4 broker port.
let pipelineScript = """
  set -euo pipefail
  d=$1; ca=$2; url=$3; port=$4
  openssl genpkey -provider tpm2 -algorithm EC -pkeyopt group:P-256 -out "$d/key.pem" 2>/dev/null
  openssl req -new -provider tpm2 -provider default -key "$d/key.pem" -subj "/CN=anchor-dev" -outform DER \\
    | base64 -w 64 > "$d/csr.b64"
  curl -sS --fail --cacert "$ca" -u "$EST_USER" -H 'Content-Type: application/pkcs10' \\
    --data-binary @"$d/csr.b64" "$url/.well-known/est/simpleenroll" \\
    | tr -d '\\r' | base64 -d | openssl pkcs7 -inform DER -print_certs -out "$d/cert.pem"
  # MQTT 3.1.1 CONNECT (client id anchor-dev), then DISCONNECT, so that the broker hangs up.
  printf '\\x10\\x16\\x00\\x04MQTT\\x04\\x02\\x00\\x3c\\x00\\x0aanchor-dev\\xe0\\x00' \\
    | openssl s_client -connect "127.0.0.1:$port" -CAfile "$ca" -verify_return_error -cert "$d/cert.pem" \\
      -key "$d/key.pem" -provider tpm2 -provider default -quiet -ign_eof > "$d/mqtt.out" 2>/dev/null
  od -An -tx1 "$d/mqtt.out" | tr -d ' \\n' | grep -q '^20020000'
  """

struct ProvisionRow {
  var name: String
  var seconds: [Double]
  var commands: Double
  var note: String
  var median: Double { seconds.sorted()[seconds.count / 2] }
}

func runProvisioning(_ options: Options, ca: TestCA, broker: MosquittoBroker, work: URL) throws {
  let ra = try RegistrationAuthority(ca: ca, password: "device:factory-secret")
  let caFile = work.appendingPathComponent("provision-ca.pem")
  try ca.certificatePEM.write(to: caFile, atomically: true, encoding: .utf8)
  let policy = TLSPolicy(trustAnchorsPEM: ca.certificatePEM, serverName: "127.0.0.1")
  let settings = EnrollmentSettings(
    server: try ESTServer(url: ra.localhostURL), trustAnchors: try Certificate.chain(pem: ca.certificatePEM),
    password: (user: "device", password: "factory-secret"))
  var rows: [ProvisionRow] = []

  /// EdgeKey as a factory tool or daemon runs it: RenewalAgent.renew (cacerts, key, CSR,
  /// enroll, checks, atomic store), then the first MQTT connection with the stored credential.
  func ours(tcti: String, name: String) throws -> ProvisionRow {
    let tpm = try TPM.open(tcti: tcti)
    var times: [Double] = []
    var commands: UInt64 = 0
    for i in 0...options.devices {  // the first one warms up (SRK, connections) and is not counted
      let before = tpm.commandCount
      let start = Date()
      let store = try CredentialStore(
        directory: work.appendingPathComponent("ours-\(name.count)-\(i)").path)
      let agent = RenewalAgent(
        store: store, tpm: tpm, settings: settings, identity: (subject: [("CN", "provision-\(i)")], names: []))
      try agent.renew()
      guard let (credential, key) = try agent.current() else { throw HarnessError("nothing stored") }
      let context = try TLSClientContext(certificateChain: credential.chain, key: key, policy: policy)
      try mqttConnect(try TLSConnection(context: context, host: "127.0.0.1", port: broker.port))
      if i > 0 {
        times.append(Date().timeIntervalSince(start))
        commands += tpm.commandCount - before
      }
    }
    return ProvisionRow(
      name: name, seconds: times, commands: Double(commands) / Double(options.devices), note: "in-process")
  }

  let direct = try SoftwareTPM()
  rows.append(try ours(tcti: direct.tcti, name: "EdgeKey, swtpm direct"))

  if findExecutable("tpm2-abrmd") != nil,
    FileManager.default.fileExists(atPath: "/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")
  {
    let swtpm = try SoftwareTPM()
    let abrmd = try AccessBroker(over: swtpm)
    rows.append(try ours(tcti: abrmd.tcti, name: "EdgeKey, through tpm2-abrmd"))

    let script = work.appendingPathComponent("provision.sh")
    try pipelineScript.write(to: script, atomically: true, encoding: .utf8)
    var env = abrmd.toolEnvironment
    env["EST_USER"] = "device:factory-secret"
    env["PATH"] = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    // TPM commands, recorded by the pcap TCTI inside each openssl process (the first device
    // warms up and is not counted).
    var commands = 0
    for i in 0...options.devices {
      let dir = work.appendingPathComponent("anchor-\(i)")
      try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
      let pcap = dir.appendingPathComponent("tpm.pcap")
      var runEnv = env
      if i > 0 {
        runEnv["TPM2OPENSSL_TCTI"] = "pcap:" + abrmd.tcti
        runEnv["TCTI_PCAP_FILE"] = pcap.path
      }
      let result = try Command.runCapturing(
        "bash", [script.path, dir.path, caFile.path, ra.localhostURL, String(broker.port)], environment: runEnv)
      guard result.status == 0 else { throw HarnessError("the pipeline failed: \(result.stderr)") }
      if i > 0 { commands += try PcapRecord.commands(in: pcap).count }
    }
    // Timed without the pcap TCTI, which adds its own cost.
    var plain: [Double] = []
    for i in 0..<options.devices {
      let dir = work.appendingPathComponent("anchor-plain-\(i)")
      try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
      let start = Date()
      let result = try Command.runCapturing(
        "bash", [script.path, dir.path, caFile.path, ra.localhostURL, String(broker.port)], environment: env)
      guard result.status == 0 else { throw HarnessError("the pipeline failed: \(result.stderr)") }
      plain.append(Date().timeIntervalSince(start))
    }
    rows.append(
      ProvisionRow(
        name: "tpm2-openssl + curl + openssl (bash)", seconds: plain,
        commands: Double(commands) / Double(options.devices), note: "5 processes"))
  } else {
    print("tpm2-openssl or tpm2-abrmd not installed: the pipeline anchor was not measured")
  }

  print("")
  print(
    "provisioning one device (\(options.devices) devices, median)".padding(toLength: 48, withPad: " ", startingAt: 0)
      + "ms/device   TPM cmds/device")
  for row in rows {
    print(
      row.name.padding(toLength: 48, withPad: " ", startingAt: 0) + String(format: "%9.1f", row.median * 1000)
        + String(format: "%18.1f", row.commands) + "   " + row.note)
  }
  if let anchor = rows.first(where: { $0.name.hasPrefix("tpm2-openssl") }),
    let same = rows.first(where: { $0.name.contains("abrmd") })
  {
    print(
      String(
        format: "EdgeKey / shell pipeline, same tpm2-abrmd: %.1f× faster, %.1f× fewer TPM commands",
        anchor.median / same.median, anchor.commands / max(same.commands, 1)))
    Report.shared.add(
      "provisioning time per device", ours: same.median * 1000, anchorName: "shell pipeline",
      anchor: anchor.median * 1000,
      unit: "ms", higherIsBetter: false)
    Report.shared.add(
      "TPM commands per provisioning", ours: same.commands, anchorName: "shell pipeline", anchor: anchor.commands,
      unit: "", higherIsBetter: false)
  }
}
