// Provisioning one device, end to end: a key created in the TPM, a CSR signed by it, EST
// enrollment at the project's RA, the credential stored, and the first MQTT connection with it
// (CONNECT/CONNACK, so the broker verified the new certificate). Side by side with the shell
// pipelines a user would write instead. The key comes from tpm2-tools (`tpm2_createprimary`,
// `tpm2_create`, `tpm2_encodeobject`) or from tpm2-openssl's `openssl genpkey`; then
// `openssl req` through tpm2-openssl, curl, `openssl pkcs7`, `openssl s_client` (mosquitto_pub
// cannot use a tpm2-openssl 1.1.1 key: "missing private key"). All reach swtpm through the same
// tpm2-abrmd; EdgeKey is also timed on swtpm directly, its embedded default. TPM commands per
// device: our TCTI counter, and the pcap TCTI inside each tpm2-tools and openssl process.
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// The user's pipelines, one device per run: $1 work dir, $2 CA file, $3 EST URL, $4 broker
/// port, $5 where the key comes from (`tools` or `genpkey`).
// (Each run's name is its own: the RA gives a name to one key only.)
let pipelineScript = """
  set -euo pipefail
  d=$1; ca=$2; url=$3; port=$4
  if [ "$5" = tools ]; then
    # The SRK template tpm2-openssl re-creates for parent 0x40000001 (TCG ECC P-256, noda).
    tpm2_createprimary -Q -C o -g sha256 -G ecc256:aes128cfb \\
      -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt' -c "$d/srk.ctx"
    tpm2_create -Q -C "$d/srk.ctx" -G ecc256:ecdsa-sha256 -u "$d/key.pub" -r "$d/key.priv"
    # tpm2-tools 5.4 writes emptyAuth inverted: -p is what gives a key without a password.
    tpm2_encodeobject -C "$d/srk.ctx" -u "$d/key.pub" -r "$d/key.priv" -p -o "$d/key.pem"
  else
    openssl genpkey -provider tpm2 -algorithm EC -pkeyopt group:P-256 -out "$d/key.pem" 2>/dev/null
  fi
  openssl req -new -provider tpm2 -provider default -key "$d/key.pem" -subj "/CN=anchor-${d##*/}" -outform DER \\
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
        store: store, tpm: tpm, settings: settings,
        identity: (subject: [("CN", "provision-\(name.count)-\(i)")], names: []))
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
    for (keys, name, note) in [
      ("tools", "tpm2-tools + openssl + curl (bash)", "8 processes"),
      ("genpkey", "tpm2-openssl + curl + openssl (bash)", "5 processes"),
    ] {
      func run(_ dir: URL, _ environment: [String: String]) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let result = try Command.runCapturing(
          "bash", [script.path, dir.path, caFile.path, ra.localhostURL, String(broker.port), keys],
          environment: environment)
        guard result.status == 0 else { throw HarnessError("the \(name) pipeline failed: \(result.stderr)") }
      }
      // TPM commands, recorded by the pcap TCTI inside each tpm2-tools and openssl process (the
      // first device warms up and is not counted).
      var commands = 0
      for i in 0...options.devices {
        let dir = work.appendingPathComponent("anchor-\(keys)-\(i)")
        let pcap = dir.appendingPathComponent("tpm.pcap")
        var recording = env
        if i > 0 {
          recording["TPM2OPENSSL_TCTI"] = "pcap:" + abrmd.tcti
          recording["TPM2TOOLS_TCTI"] = "pcap:" + abrmd.tcti
          recording["TCTI_PCAP_FILE"] = pcap.path
        }
        try run(dir, recording)
        if i > 0 { commands += try PcapRecord.commands(in: pcap).count }
      }
      // Timed without the pcap TCTI, which adds its own cost.
      var plain: [Double] = []
      for i in 0..<options.devices {
        let start = Date()
        try run(work.appendingPathComponent("anchor-\(keys)-plain-\(i)"), env)
        plain.append(Date().timeIntervalSince(start))
      }
      rows.append(
        ProvisionRow(name: name, seconds: plain, commands: Double(commands) / Double(options.devices), note: note))
    }
  } else {
    print("tpm2-openssl or tpm2-abrmd not installed: the pipeline anchors were not measured")
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
  if let same = rows.first(where: { $0.name.contains("abrmd") }) {
    for anchor in rows where anchor.name.hasSuffix("(bash)") {
      let tools = anchor.name.hasPrefix("tpm2-tools")
      let anchorName = tools ? "tpm2-tools pipeline" : "tpm2-openssl pipeline"
      print(
        "EdgeKey / \(anchorName), same tpm2-abrmd: "
          + String(
            format: "%.1f× faster, %.1f× fewer TPM commands", anchor.median / same.median,
            anchor.commands / max(same.commands, 1)))
      Report.shared.add(
        "provisioning time per device", ours: same.median * 1000, anchorName: anchorName, anchor: anchor.median * 1000,
        unit: "ms", higherIsBetter: false)
      Report.shared.add(
        "TPM commands per provisioning", ours: same.commands, anchorName: anchorName, anchor: anchor.commands,
        unit: "", higherIsBetter: false)
    }
  }
}
