import COpenSSL
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTestSupport
import Foundation
import Testing

/// The built `edgekey` binary.
func edgekeyBinary() throws -> String { try builtExecutable("edgekey") }

/// A loopback fleet for one test: swtpm, a CA, the registration authority, an mTLS broker, and
/// a work directory holding the CA file.
struct Fleet {
  let swtpm: SoftwareTPM
  let ca: TestCA
  let ra: RegistrationAuthority
  let broker: MosquittoBroker
  let dir: URL
  let caFile: String

  /// - Parameter raArguments: more `edgekey-ra` flags, e.g. `["--pending", "100"]`.
  init(lifetime: String = "30d", backdate: String = "60", raArguments: [String] = []) throws {
    swtpm = try SoftwareTPM()
    ca = try TestCA()
    ra = try RegistrationAuthority(ca: ca, lifetime: lifetime, backdate: backdate, extraArguments: raArguments)
    let serverCert = try ca.issueServer()
    broker = try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: ca.certificatePEM)
    dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    caFile = dir.appendingPathComponent("ca.pem").path
    try ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
  }

  var state: String { dir.appendingPathComponent("state").path }
  func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

  /// `edgekey enroll` by password into `state`; returns its exit status and stderr.
  func enroll(commonName: String) throws -> (status: Int32, stderr: String) {
    let result = try Command.runCapturing(
      try edgekeyBinary(),
      [
        "enroll", "--state", state, "--server", ra.localhostURL, "--cafile", caFile, "--subject", "CN=\(commonName)",
        "--password-env", "EST_PASSWORD",
      ], environment: environment)
    return (result.status, result.stderr)
  }

  /// The process environment plus the enrollment password and this fleet's TPM.
  var environment: [String: String] {
    var env = ProcessInfo.processInfo.environment
    env["EST_PASSWORD"] = "device:factory-secret"
    env["EDGEKEY_TCTI"] = swtpm.tcti
    return env
  }
}

@Suite("edgekey command line")
struct CLITests {
  func run(_ args: [String], tcti: String?) throws -> (status: Int32, stdout: String, stderr: String) {
    var env = ProcessInfo.processInfo.environment
    env["EDGEKEY_TCTI"] = tcti
    env["TPM2TOOLS_TCTI"] = nil
    return try Command.runCapturing(try edgekeyBinary(), args, environment: env)
  }

  @Test("edgekey links FoundationEssentials, never the full Foundation with ICU (6.5 MB of resident memory)")
  func noFoundation() throws {
    let linked = try Command.runCapturing(
      "ldd", [try edgekeyBinary()], environment: ProcessInfo.processInfo.environment)
    #expect(linked.status == 0, "\(linked.stderr)")
    #expect(linked.stdout.contains("libFoundationEssentials.so"))
    #expect(!linked.stdout.contains("libFoundation.so"), "a device library imports Foundation: \(linked.stdout)")
    #expect(!linked.stdout.contains("FoundationICU"))
  }

  @Test("key create, show, list and delete round trip through the binary")
  func keyLifecycle() throws {
    let swtpm = try SoftwareTPM()
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    let keyPath = dir.appendingPathComponent("device.key").path

    let created = try run(["key", "create", "--out", keyPath, "--json"], tcti: swtpm.tcti)
    #expect(created.status == 0, "\(created.stderr)")
    #expect(created.stdout.contains("\"algorithm\":\"ecc-p256\""))
    #expect(created.stdout.contains("\"nonExportable\":true"))
    let mode = try FileManager.default.attributesOfItem(atPath: keyPath)[.posixPermissions] as? Int
    #expect(mode == 0o600)

    let shown = try run(["key", "show", "--file", keyPath], tcti: swtpm.tcti)
    #expect(shown.status == 0)
    #expect(shown.stdout.contains("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign"))

    let persisted = try run(["key", "create", "-a", "rsa-2048", "-c", "0x81000005"], tcti: swtpm.tcti)
    #expect(persisted.status == 0, "\(persisted.stderr)")
    #expect(persisted.stderr.contains("several seconds"))
    let listed = try run(["key", "list"], tcti: swtpm.tcti)
    #expect(listed.stdout.contains("0x81000005  rsa-2048"))
    #expect(try run(["key", "delete", "-c", "0x81000005"], tcti: swtpm.tcti).status == 0)
    #expect(try !run(["key", "list"], tcti: swtpm.tcti).stdout.contains("0x81000005"))
    #expect(try run(["key", "delete", "--file", keyPath], tcti: swtpm.tcti).status == 0)
    #expect(!FileManager.default.fileExists(atPath: keyPath))
  }

  @Test("agent: enrolls by password, publishes, renews with 6-second certificates, stops on SIGTERM with nothing lost")
  func agent() throws {
    let f = try Fleet(lifetime: "6s", backdate: "1")
    let (state, broker, swtpm) = (f.state, f.broker, f.swtpm)
    let agent = try ChildProcess(
      try edgekeyBinary(),
      [
        "agent", "--state", state, "--server", f.ra.localhostURL, "--cafile", f.caFile, "-h", "127.0.0.1", "-p",
        String(broker.port), "-t", "devices/agent-1/telemetry", "--interval", "0.2", "--subject",
        "O=EdgeKey Tests,CN=agent-1", "--password-env", "EST_PASSWORD", "--outbox", f.path("outbox.db"), "--tcti",
        swtpm.tcti,
      ], logPath: f.path("agent.log"), environment: f.environment)
    func agentStatus() -> [String: Any] {
      guard let data = FileManager.default.contents(atPath: state + "/status.json"),
        let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
      else { return [:] }
      return json
    }
    func renewals() -> Int { ((agentStatus()["renewal"] as? [String: Any])?["renewals"] as? Int) ?? 0 }
    let deadline = Date().addingTimeInterval(30)
    while renewals() < 3 && Date() < deadline && agent.isRunning { usleep(100_000) }
    #expect(renewals() >= 3, "enrolled and renewed twice")
    let shown = try run(["status", "--state", state, "--json"], tcti: swtpm.tcti)
    #expect(shown.status == 0, "\(shown.stderr)")
    #expect(shown.stdout.contains("\"subject\":\"CN=agent-1,O=EdgeKey Tests\""))
    #expect(shown.stdout.contains("\"state\":\"connect"), "running: connected, or reconnecting with a new certificate")

    #expect(shown.stdout.contains("\"broker\":\"127.0.0.1:\(broker.port)\""))
    // SIGHUP reloads and renews now; the agent keeps running.
    let before = renewals()
    agent.send(SIGHUP)
    let reload = Date().addingTimeInterval(10)
    while renewals() == before && Date() < reload { usleep(100_000) }
    #expect(renewals() > before, "SIGHUP renews at once")
    #expect(agent.isRunning)

    agent.send(SIGTERM)
    while agent.isRunning && Date() < deadline.addingTimeInterval(20) { usleep(50_000) }
    #expect(!agent.isRunning, "SIGTERM stops the agent")
    #expect(agent.exitCode == 0)
    let final = agentStatus()
    let mqtt = final["mqtt"] as? [String: Any] ?? [:]
    #expect(final["state"] as? String == "stopped")
    #expect((mqtt["messagesQueued"] as? Int ?? 0) > 5)
    #expect(mqtt["messagesAcknowledged"] as? Int == mqtt["messagesQueued"] as? Int, "every message delivered")
    #expect((mqtt["connections"] as? Int ?? 0) >= 3, "a new connection per certificate")
    #expect(((final["renewal"] as? [String: Any])?["keysRetired"] as? Int ?? 0) >= 2)
    let text = try String(contentsOfFile: f.path("agent.log"), encoding: .utf8)
    #expect(text.contains("agent stopped"))
    #expect(!text.contains("factory-secret"), "the password is never logged")
  }

  @Test("agent on a TPM cleared or replaced under its state: refuses without a password, re-enrolls with one")
  func agentAfterTPMReplaced() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "agent-lost").status == 0)
    try f.swtpm.replaceWithFresh()
    let common = [
      "agent", "--state", f.state, "--server", f.ra.localhostURL, "--cafile", f.caFile, "-h", "127.0.0.1", "-p",
      String(f.broker.port), "--tcti", f.swtpm.tcti,
    ]
    let refused = try Command.runCapturing(try edgekeyBinary(), common, environment: f.environment)
    #expect(refused.status == 1)
    #expect(refused.stderr.contains("can no longer load"), "\(refused.stderr)")
    #expect(refused.stderr.contains("provision the device again"))
    // A new key cannot take, on the shared password, the name the lost device still holds
    // (RegistryPolicyTests); the operator retires the lost device, which frees its name for the replacement key.
    #expect(try f.ra.admin(["retire", "agent-lost"]).status == 0)

    let agent = try ChildProcess(
      try edgekeyBinary(), common + ["--password-env", "EST_PASSWORD"], logPath: f.path("agent.log"),
      environment: f.environment)
    func renewal() -> [String: Any] {
      guard let data = FileManager.default.contents(atPath: f.state + "/status.json"),
        let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
      else { return [:] }
      return json["renewal"] as? [String: Any] ?? [:]
    }
    let deadline = Date().addingTimeInterval(30)
    while (renewal()["renewals"] as? Int ?? 0) < 1 && Date() < deadline && agent.isRunning { usleep(100_000) }
    #expect(renewal()["renewals"] as? Int == 1, "enrolled a new key")
    #expect((renewal()["credentialsLost"] as? Int ?? 0) >= 1)
    agent.send(SIGTERM)
    while agent.isRunning && Date() < deadline.addingTimeInterval(20) { usleep(50_000) }
    #expect(agent.exitCode == 0)
    let log = try String(contentsOfFile: f.path("agent.log"), encoding: .utf8)
    #expect(log.contains("can no longer be loaded by this TPM"), "\(log)")
    // tpm2-tss's own ERROR lines for what EdgeKey handles (0x1df here) stay off stderr.
    #expect(!log.contains("ERROR:esys"), "\(log)")
    #expect(!refused.stderr.contains("ERROR:esys"))
  }

  @Test(
    "enroll --channel-binding binds the request to its TLS connection; a server that requires it refuses one that is not"
  )
  func enrollChannelBinding() throws {
    let f = try Fleet(raArguments: ["--channel-binding", "--tls-max", "1.2"])
    let ra = f.ra
    func enroll(_ state: String, _ extra: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
      try Command.runCapturing(
        try edgekeyBinary(),
        [
          "enroll", "--state", f.path(state), "--server", ra.localhostURL, "--cafile", f.caFile, "--subject",
          "CN=bound-1", "--password-env", "EST_PASSWORD",
        ] + extra, environment: f.environment)
    }
    let unbound = try enroll("a", [])
    #expect(unbound.status == 1)
    #expect(unbound.stderr.contains("tls-unique"), "\(unbound.stderr)")
    let bound = try enroll("b", ["--channel-binding"])
    #expect(bound.status == 0, "\(bound.stderr)")
    #expect(ra.issuanceLog.count == 1)
  }

  @Test("SIGTERM while the agent waits out a 120 s Retry-After: it stops at once, nothing issued")
  func agentStopsDuringPendingWait() throws {
    let f = try Fleet(raArguments: ["--pending", "100", "--retry-after", "120"])
    let log = f.path("agent.log")
    let agent = try ChildProcess(
      try edgekeyBinary(),
      [
        "agent", "--state", f.state, "--server", f.ra.localhostURL, "--cafile", f.caFile, "-h", "127.0.0.1", "-p",
        "1", "--subject", "CN=pending-1", "--password-env", "EST_PASSWORD", "--tcti", f.swtpm.tcti, "-v",
      ], logPath: log, environment: f.environment)
    defer { agent.stop() }
    var deadline = Date().addingTimeInterval(30)
    func text() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
    while !text().contains("waiting 120 s") && Date() < deadline && agent.isRunning { usleep(50_000) }
    #expect(text().contains("waiting 120 s as the server asks"), "\(text())")
    agent.send(SIGTERM)
    deadline = Date().addingTimeInterval(20)  // far less than the 120 s the server asked for
    while agent.isRunning && Date() < deadline { usleep(20_000) }
    #expect(!agent.isRunning, "SIGTERM during the wait")
    #expect(agent.exitCode == 0)
    #expect(f.ra.issuanceLog.isEmpty)
  }

  @Test(
    "status.json keeps each layer's last error with its time; status escapes control characters; one agent per state")
  func agentStatusErrors() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "status-1").status == 0)
    let args = [
      "agent", "--state", f.state, "--server", f.ra.localhostURL, "--cafile", f.caFile, "-h", "127.0.0.1", "-p",
      String(f.broker.port), "--tcti", f.swtpm.tcti, "--password-env", "EST_PASSWORD",
    ]
    let agent = try ChildProcess(try edgekeyBinary(), args, logPath: f.path("agent.log"), environment: f.environment)
    defer { agent.stop() }
    func status() -> [String: Any] {
      guard let data = FileManager.default.contents(atPath: f.state + "/status.json"),
        let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
      else { return [:] }
      return json
    }
    var deadline = Date().addingTimeInterval(30)
    while status()["state"] as? String != "connected" && Date() < deadline && agent.isRunning { usleep(100_000) }
    #expect(status()["state"] as? String == "connected")

    // A second agent on the same state directory is refused at start.
    let second = try Command.runCapturing(try edgekeyBinary(), args, environment: f.environment)
    #expect(second.status == 1)
    #expect(second.stderr.contains("another edgekey agent (pid \(agent.pid)) already uses"), "\(second.stderr)")

    // The broker goes away: the broker layer's error is recorded; the RA goes away and a renewal
    // is asked for (SIGHUP): the enrollment layer's too. Both keep their time.
    f.broker.kill9()
    f.ra.stop()
    agent.send(SIGHUP)
    deadline = Date().addingTimeInterval(30)
    func errors() -> [String: [String: String]] { status()["errors"] as? [String: [String: String]] ?? [:] }
    while (errors()["broker"] == nil || errors()["enrollment"] == nil) && Date() < deadline && agent.isRunning {
      usleep(100_000)
    }
    let recorded = errors()
    #expect(recorded["broker"]?["error"]?.isEmpty == false, "\(recorded)")
    #expect(recorded["enrollment"]?["error"]?.contains("enrollment") == true, "\(recorded)")
    #expect(recorded["broker"]?["time"]?.hasSuffix("Z") == true)
    #expect((status()["lastError"] as? String)?.isEmpty == false)
    agent.stop()

    // What the file says reaches the terminal escaped.
    try "{\"state\":\"stopped\",\"lastError\":\"\u{1B}[2J\u{1B}[31mboom\u{07}\"}\n".write(
      toFile: f.state + "/status.json", atomically: true, encoding: .utf8)
    let shown = try run(["status", "--state", f.state], tcti: f.swtpm.tcti)
    #expect(shown.status == 0, "\(shown.stderr)")
    #expect(!shown.stdout.contains("\u{1B}"))
    #expect(!shown.stdout.contains("\u{07}"))
    #expect(shown.stdout.contains("\\u001b[2J"))
  }

  @Test("provision: one JSON line; interrupted at many points and run again, it resumes to one working credential")
  func provision() throws {
    let f = try Fleet()
    let (state, ra, broker) = (f.state, f.ra, f.broker)
    let arguments = [
      "provision", "--state", state, "--server", ra.localhostURL, "--cafile", f.caFile, "--subject",
      "O=EdgeKey Tests,CN=line-7", "-h", "127.0.0.1", "-p", String(broker.port), "--password-env", "EST_PASSWORD",
      "--tcti", f.swtpm.tcti,
    ]
    let environment = f.environment
    let log = f.path("provision.log")

    // Power pulled at growing moments until one run gets to the end by itself.
    var delay = 0.0
    var kills = 0
    while true {
      let p = try ChildProcess(try edgekeyBinary(), arguments, logPath: log, environment: environment)
      let deadline = Date().addingTimeInterval(delay)
      while p.isRunning && Date() < deadline { usleep(500) }
      if !p.isRunning { break }
      p.kill9()
      kills += 1
      delay += 0.01
      // Whatever the moment: never a key without its certificate in current.pem, and at most
      // one key waiting in next.pem. (A write cut short leaves its temporary file, which the
      // next run removes.)
      let files = ((try? FileManager.default.contentsOfDirectory(atPath: state)) ?? []).filter { !$0.contains(".tmp-") }
      #expect(Set(files).isSubset(of: ["current.pem", "next.pem", "anchors.pem", "previous.pem"]), "\(files)")
      if files.contains("current.pem") {
        let text = try String(contentsOfFile: state + "/current.pem", encoding: .utf8)
        #expect(text.contains("-----BEGIN CERTIFICATE-----"))
      }
    }
    let finished = try String(contentsOfFile: log, encoding: .utf8)
    #expect(finished.contains("\"ok\":true"), "\(finished)")
    #expect(finished.contains("\"ekCertificate\":false"))
    #expect(kills >= 3, "interrupted at several points before finishing")
    // One key ever made, whatever the interruptions (a run killed after the RA answered gets
    // that key certified again); and a later run changes nothing.
    func keys() -> Set<String> {
      Set(
        ra.issuanceLog.compactMap { $0.components(separatedBy: "\"keyFingerprint\":\"").dropFirst().first?.prefix(64) }
          .map(String.init))
    }
    #expect(keys().count == 1, "\(ra.issuanceLog)")
    let issued = ra.issuanceLog.count
    let again = try Command.runCapturing(try edgekeyBinary(), arguments, environment: environment)
    #expect(again.status == 0, "\(again.stderr)")
    #expect(again.stdout.contains("\"resumed\":true"))
    #expect(ra.issuanceLog.count == issued)
    #expect(!FileManager.default.fileExists(atPath: state + "/next.pem"))
    #expect(try FileManager.default.contentsOfDirectory(atPath: state).allSatisfy { !$0.contains(".tmp-") })

    // A device whose broker refuses it: the step that failed, exit 1.
    let refused = try Command.runCapturing(
      try edgekeyBinary(), arguments.map { $0 == String(broker.port) ? String(try! PortFinder.free()) : $0 },
      environment: environment)
    #expect(refused.status == 1)
    #expect(refused.stdout.contains("\"failedStep\":\"verify\""))
  }

  @Test("the example factory script provisions a batch of simulated devices, one JSON line each")
  func factoryExample() throws {
    let root = URL(fileURLWithPath: try edgekeyBinary()).deletingLastPathComponent()
    let out = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-batch-\(UUID().uuidString).jsonl")
    var environment = ProcessInfo.processInfo.environment
    environment["BIN_DIR"] = root.path
    environment["OUT"] = out.path
    let scriptPath = root.deletingLastPathComponent().deletingLastPathComponent()
      .appendingPathComponent("Examples/factory/provision-batch.sh").path
    // A ChildProcess, not Foundation's Process: it starts the script with no signal blocked, as
    // a shell would (a test runner's threads block SIGTERM, and the script's servers inherit it).
    let log = out.path + ".log"
    let script = try ChildProcess("/bin/bash", [scriptPath, "3"], logPath: log, environment: environment)
    let deadline = Date().addingTimeInterval(60)
    while script.isRunning && Date() < deadline { usleep(50_000) }
    let printed = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
    #expect(script.exitCode == 0, "\(printed)")
    #expect(printed.contains("3 of 3 devices provisioned"))
    let lines = try String(contentsOf: out, encoding: .utf8).split(separator: "\n")
    #expect(lines.count == 3)
    #expect(lines.allSatisfy { $0.contains("\"ok\":true") })
    #expect(Set(lines.compactMap { $0.components(separatedBy: "\"keyFingerprint\":").last?.prefix(72) }).count == 3)
  }

  @Test(
    "CMake builds and installs the C library with pkg-config and find_package files; the C daemon publishes with the TPM key"
  )
  func cmakeAndCDaemon() throws {
    let root = URL(fileURLWithPath: try edgekeyBinary()).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent()
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-cmake-\(UUID().uuidString)")
    let (build, prefix, example) = (
      dir.appendingPathComponent("build").path, dir.appendingPathComponent("prefix").path,
      dir.appendingPathComponent("example").path
    )
    try Command.run(
      "cmake", ["-S", root.appendingPathComponent("CMake").path, "-B", build, "-DCMAKE_INSTALL_PREFIX=\(prefix)"])
    try Command.run("cmake", ["--build", build, "-j", "2"])
    try Command.run("cmake", ["--install", build])
    // A consumer of the installed package: find_package(EdgeKey), the shared library.
    try Command.run(
      "cmake",
      ["-S", root.appendingPathComponent("Examples/c-daemon").path, "-B", example, "-DCMAKE_PREFIX_PATH=\(prefix)"])
    try Command.run("cmake", ["--build", example])
    let pc = try Command.run(
      "pkg-config", ["--cflags", "--libs", "edgekey"], environment: ["PKG_CONFIG_PATH": prefix + "/lib/pkgconfig"])
    #expect(pc.contains("-ledgekey") && pc.contains("include/edgekey"))

    // A device: a key in swtpm made by the CLI, a certificate for it, a broker that wants it.
    let swtpm = try SoftwareTPM()
    let ca = try TestCA()
    let keyPath = dir.appendingPathComponent("device.key").path
    let created = try run(["key", "create", "--out", keyPath, "--json"], tcti: swtpm.tcti)
    let publicPEM = try #require(
      created.stdout.components(separatedBy: "\"publicKey\":\"").last?.components(separatedBy: "\"").first?
        .replacingOccurrences(of: "\\n", with: "\n"))
    let spki = try #require(PEM.decode(publicPEM, label: "PUBLIC KEY"))
    let certPath = dir.appendingPathComponent("device.pem").path
    try ca.issueClient(publicKeyDER: spki, commonName: "c-daemon-1").certificate.write(
      toFile: certPath, atomically: true, encoding: .utf8)
    let caPath = dir.appendingPathComponent("ca.pem").path
    try ca.certificatePEM.write(toFile: caPath, atomically: true, encoding: .utf8)
    let serverCert = try ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: ca.certificatePEM)
    var environment = ProcessInfo.processInfo.environment
    environment["EDGEKEY_TCTI"] = swtpm.tcti
    environment["LD_LIBRARY_PATH"] = prefix + "/lib"
    for binary in [build + "/edgekey-c-daemon", example + "/edgekey-c-daemon"] {
      let published = try Command.runCapturing(
        binary, [keyPath, certPath, caPath, "127.0.0.1", String(broker.port), "devices/c-daemon-1/t", "20"],
        environment: environment)
      #expect(published.status == 0, "\(binary): \(published.stderr)")
      #expect(published.stdout.contains("published 20, acknowledged 20"))
    }
    // A broker we do not trust: refused, and the reason names the server's certificate.
    let stranger = dir.appendingPathComponent("other-ca.pem").path
    try TestCA(name: "Other CA").certificatePEM.write(toFile: stranger, atomically: true, encoding: .utf8)
    let refused = try Command.runCapturing(
      build + "/edgekey-c-daemon", [keyPath, certPath, stranger, "127.0.0.1", String(broker.port), "t", "1"],
      environment: environment)
    #expect(refused.status == 1)
    #expect(refused.stderr.contains("not among our trust anchors"), "\(refused.stderr)")
  }

  @Test("the hardware acceptance script passes on swtpm and reports each check")
  func acceptanceScript() throws {
    let swtpm = try SoftwareTPM()
    let binary = try edgekeyBinary()
    let script = URL(fileURLWithPath: binary).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent().appendingPathComponent("Hardware/acceptance.sh").path
    var environment = ProcessInfo.processInfo.environment
    environment["EDGEKEY_TCTI"] = swtpm.tcti
    let result = try Command.runCapturing("bash", [script, "--edgekey", binary], environment: environment)
    #expect(result.status == 0, "\(result.stdout)\n\(result.stderr)")
    for check in ["✓ TPM reachable", "not in lockout", "✓ ECC P-256", "✓ sign (CSR, OpenSSL verifies)"] {
      #expect(result.stdout.contains(check), "\(check)")
    }
    #expect(!result.stdout.contains("✗"))
    #expect(result.stdout.contains("this TPM does what EdgeKey needs"))
    // Nothing was left in the TPM.
    #expect(try !run(["key", "list"], tcti: swtpm.tcti).stdout.contains("0x81"))
    // No TPM at all: a failed check, exit 1.
    environment["EDGEKEY_TCTI"] = "swtpm:host=127.0.0.1,port=\(try PortFinder.free())"
    let missing = try Command.runCapturing("bash", [script, "--edgekey", binary], environment: environment)
    #expect(missing.status == 1)
    #expect(missing.stdout.contains("✗ TPM reachable"))
  }

  @Test("doctor --protocol est walks the layers to an EST server; --help shows one command")
  func doctorEST() throws {
    let f = try Fleet()
    let (state, ra, caFile, swtpm) = (f.state, f.ra, f.caFile, f.swtpm)
    let enrolled = try f.enroll(commonName: "doc-1")
    #expect(enrolled.status == 0, "\(enrolled.stderr)")
    let current = state + "/current.pem"
    let walked = try run(
      [
        "doctor", "--protocol", "est", "--host", "localhost", "--port", String(ra.port), "--cafile", caFile,
        "--cert", current, "--file", current,
      ], tcti: swtpm.tcti)
    #expect(walked.status == 0, "\(walked.stdout)\(walked.stderr)")
    for layer in ["✓ server certificate", "✓ EST cacerts", "✓ EST csrattrs", "· re-enrollment"] {
      #expect(walked.stdout.contains(layer), "\(layer)")
    }
    // A ✓ only for what was tried: re-enrollment was not (it would issue a certificate).
    #expect(!walked.stdout.contains("✓ re-enrollment"))
    #expect(walked.stdout.contains("not checked"))

    let help = try run(["provision", "--help"], tcti: nil)
    #expect(help.status == 0)
    #expect(help.stdout.contains("edgekey provision --state"))
    #expect(!help.stdout.contains("edgekey pub "))
    #expect(help.stdout.contains("Exit codes"))
  }

  @Test("tpm info reports the simulator, as text and JSON")
  func tpmInfo() throws {
    let swtpm = try SoftwareTPM()
    let text = try run(["tpm", "info"], tcti: swtpm.tcti)
    #expect(text.status == 0)
    #expect(text.stdout.contains("IBM"))
    #expect(text.stdout.contains("no resource manager"))
    let json = try run(["tpm", "info", "--json"], tcti: swtpm.tcti)
    let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
    #expect((object?["supportedKeys"] as? [String])?.contains("ecc-p384") == true)
    #expect((object?["endorsementKeys"] as? [Any])?.isEmpty == true, "swtpm without swtpm_setup has no EK certificate")
    // A TPM manufactured with an EK certificate: its issuer, and that the EK is its key.
    let manufactured = try SoftwareTPM(endorsementCertificates: true)
    let withEK = try run(["tpm", "info"], tcti: manufactured.tcti)
    #expect(
      withEK.stdout.contains("endorsement key:   rsa-2048 at 0x1c00002: issuer CN=swtpm-localca"), "\(withEK.stdout)")
    #expect(withEK.stdout.contains("the re-created EK is its key"))
    let withEKJSON = try run(["tpm", "info", "--json"], tcti: manufactured.tcti)
    let keys =
      (try JSONSerialization.jsonObject(with: Data(withEKJSON.stdout.utf8)) as? [String: Any])?[
        "endorsementKeys"] as? [[String: Any]]
    #expect(keys?.first?["matchesKey"] as? Bool == true)
  }

  @Test("--config: a file's options apply, the command line wins, a bad line is a usage error naming it")
  func configFile() throws {
    let swtpm = try SoftwareTPM()
    let conf = temporaryPath("edgekey.conf")
    try FileManager.default.createDirectory(
      atPath: (conf as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    try "# device settings\ntcti = \"\(swtpm.tcti)\"\njson = yes\n".write(
      toFile: conf, atomically: true, encoding: .utf8)
    let fromFile = try run(["tpm", "info", "--config", conf], tcti: nil)
    #expect(fromFile.status == 0)
    #expect(fromFile.stdout.hasPrefix("{\"tcti\":"))
    let port = try PortFinder.freePair()
    let overridden = try run(
      ["tpm", "info", "--config", conf, "--tcti", "swtpm:host=127.0.0.1,port=\(port)"], tcti: nil)
    #expect(overridden.status == 3)
    try "json = yes\ntcit = x\n".write(toFile: conf, atomically: true, encoding: .utf8)
    let unknown = try run(["tpm", "info", "--config", conf], tcti: swtpm.tcti)
    #expect(unknown.status == 2)
    #expect(unknown.stderr.contains("edgekey.conf:2: unknown option \"tcit\""))
    #expect(!unknown.stderr.contains("Usage:"))
  }

  @Test("exit codes: 2 for usage errors, 3 when no TPM answers, errors on stderr")
  func exitCodes() throws {
    let usage = try run(["key", "frobnicate"], tcti: nil)
    #expect(usage.status == 2)
    #expect(usage.stderr.contains("unknown command"))
    #expect(usage.stdout.isEmpty)
    let badHandle = try run(["key", "show", "--handle", "0x01000000"], tcti: nil)
    #expect(badHandle.status == 2)
    let port = try PortFinder.freePair()
    let unreachable = try run(["tpm", "info"], tcti: "swtpm:host=127.0.0.1,port=\(port)")
    #expect(unreachable.status == 3)
    #expect(unreachable.stderr.contains("no TPM answered"))
    // The TSS's own logging is kept off stderr unless -v.
    #expect(!unreachable.stderr.contains("ERROR:tcti"))
    let help = try run(["--help"], tcti: nil)
    #expect(help.status == 0 && help.stdout.contains("Exit codes"))
  }

  @Test("a command that exits with a key loaded flushes it, over a TCTI without a resource manager however spelled")
  func exitFlushesLoadedKeys() throws {
    let swtpm = try SoftwareTPM()
    let tcti = "libtss2-tcti-swtpm.so.0:host=127.0.0.1,port=\(swtpm.port)"
    let key = temporaryPath("flush.key")
    try FileManager.default.createDirectory(
      atPath: (key as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    #expect(try run(["key", "create", "--out", key], tcti: tcti).status == 0)
    for _ in 0..<4 {
      // Signs a CSR (loads the key), then exits: nothing may stay in the TPM's three slots.
      let made = try run(["csr", "--file", key, "--subject", "CN=flush", "--out", key + ".csr"], tcti: tcti)
      #expect(made.status == 0, "\(made.stderr)")
      let left = try swtpm.run("tpm2_getcap", ["handles-transient"])
      #expect(left.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "left loaded: \(left)")
    }
  }

  @Test("a TPM that hangs: tpm info and csr end with a typed timeout instead of waiting forever")
  func hungTPMEndsCommands() throws {
    let swtpm = try SoftwareTPM()
    let key = temporaryPath("hung.key")
    try FileManager.default.createDirectory(
      atPath: (key as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    #expect(try run(["key", "create", "--out", key], tcti: swtpm.tcti).status == 0)
    swtpm.pause()
    defer { swtpm.resume() }
    var env = ProcessInfo.processInfo.environment
    env["EDGEKEY_TCTI"] = swtpm.tcti
    env["TPM2TOOLS_TCTI"] = nil
    env["EDGEKEY_TPM_TIMEOUT_MS"] = "500"
    let info = try Command.runCapturing(try edgekeyBinary(), ["tpm", "info"], environment: env)
    #expect(info.status == 3, "\(info.stderr)")
    #expect(info.stderr.contains("did not answer in time"), "\(info.stderr)")
    let csr = try Command.runCapturing(
      try edgekeyBinary(), ["csr", "--file", key, "--subject", "CN=hung", "--out", key + ".csr"], environment: env)
    #expect(csr.status != 0)
    #expect(csr.stderr.contains("did not answer in time") || csr.stderr.contains("no TPM answered"), "\(csr.stderr)")
  }

  @Test("csr writes a request that openssl req -verify accepts")
  func csr() throws {
    let swtpm = try SoftwareTPM()
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let key = dir.appendingPathComponent("device.key").path
    let csr = dir.appendingPathComponent("device.csr").path
    #expect(try run(["key", "create", "--out", key], tcti: swtpm.tcti).status == 0)
    let made = try run(
      [
        "csr", "--file", key, "--subject", "O=Fleet,CN=device-9", "--san", "DNS:device-9.local,IP:10.0.0.9", "--out",
        csr,
      ],
      tcti: swtpm.tcti)
    #expect(made.status == 0, "\(made.stderr)")
    let verified = try Command.runCapturing("openssl", ["req", "-in", csr, "-verify", "-noout", "-subject"])
    #expect(verified.status == 0)
    #expect((verified.stdout + verified.stderr).contains("verify OK"))
    #expect(verified.stdout.contains("CN = device-9"))
    #expect(try run(["csr", "--file", key], tcti: swtpm.tcti).status == 2)  // no subject: usage
  }

  @Test("doctor walks the layers to a broker: all pass, then the server chain fails with the reason")
  func doctor() throws {
    let swtpm = try SoftwareTPM()
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let key = dir.appendingPathComponent("device.key").path
    let created = try run(["key", "create", "--out", key, "--json"], tcti: swtpm.tcti)
    #expect(created.status == 0)
    // The device's certificate, issued for the public key tpm2-openssl reads from the file.
    let ca = try TestCA()
    let spkiPEM = try Command.run(
      "openssl", ["pkey", "-provider", "tpm2", "-provider", "default", "-in", key, "-pubout"],
      environment: swtpm.toolEnvironment)
    let der = try #require(PEMText.decode(spkiPEM))
    let cert = try ca.issueClient(publicKeyDER: der, commonName: "device-9")
    let certPath = dir.appendingPathComponent("device.pem").path
    let caPath = dir.appendingPathComponent("ca.pem").path
    try cert.certificate.write(toFile: certPath, atomically: true, encoding: .utf8)
    try ca.certificatePEM.write(toFile: caPath, atomically: true, encoding: .utf8)
    let server = try ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: ca.certificatePEM)
    let args = [
      "doctor", "--host", "127.0.0.1", "--port", String(broker.port), "--cafile", caPath, "--cert", certPath,
      "--file", key,
    ]
    let good = try run(args, tcti: swtpm.tcti)
    #expect(good.status == 0, "\(good.stdout)\(good.stderr)")
    for layer in [
      "TPM and key", "our certificate", "server certificate", "protocol", "server accepted us", "MQTT connect",
      "authorized to publish",
    ] {
      #expect(good.stdout.contains("✓ \(layer)"), "\(layer) in \(good.stdout)")
    }
    // Authorization is the broker's ACL: devices/<CN>/# only. Another device's prefix is refused.
    let acl = try String(
      contentsOf: URL(fileURLWithPath: try edgekeyBinary()).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Examples/broker/acl"), encoding: .utf8)
    let guarded = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: ca.certificatePEM, aclFile: acl)
    var own = args
    own[own.firstIndex(of: String(broker.port))!] = String(guarded.port)
    let allowed = try run(own, tcti: swtpm.tcti)
    #expect(allowed.stdout.contains("✓ authorized to publish"), "\(allowed.stdout)")
    let denied = try run(own + ["-t", "devices/device-10/doctor"], tcti: swtpm.tcti)
    #expect(denied.status == 1)
    #expect(denied.stdout.contains("✓ MQTT connect"))
    #expect(denied.stdout.contains("✗ authorized to publish"), "\(denied.stdout)")
    let stranger = try TestCA(name: "Stranger CA")
    let strangerPath = dir.appendingPathComponent("stranger.pem").path
    try stranger.certificatePEM.write(toFile: strangerPath, atomically: true, encoding: .utf8)
    var wrongCA = args
    wrongCA[wrongCA.firstIndex(of: caPath)!] = strangerPath
    let bad = try run(wrongCA, tcti: swtpm.tcti)
    #expect(bad.status == 1)
    #expect(bad.stdout.contains("✓ our certificate"))
    #expect(bad.stdout.contains("✗ server certificate"))
    #expect(bad.stdout.contains("issuer \"CN=EdgeKey Test Root CA\""))
  }
}

/// A device made with the CLI: a TPM key file and a certificate from `ca` for it.
struct CLIDevice {
  let keyPath: String
  let certPath: String
  let caPath: String

  init(in dir: URL, swtpm: SoftwareTPM, ca: TestCA, commonName: String, run: ([String]) throws -> Int32) throws {
    keyPath = dir.appendingPathComponent("\(commonName).key").path
    guard try run(["key", "create", "--out", keyPath]) == 0 else { throw HarnessError("key create failed") }
    let spkiPEM = try Command.run(
      "openssl", ["pkey", "-provider", "tpm2", "-provider", "default", "-in", keyPath, "-pubout"],
      environment: swtpm.toolEnvironment)
    guard let der = PEMText.decode(spkiPEM) else { throw HarnessError("no public key from tpm2-openssl") }
    certPath = dir.appendingPathComponent("\(commonName).pem").path
    caPath = dir.appendingPathComponent("ca.pem").path
    try ca.issueClient(publicKeyDER: der, commonName: commonName).certificate.write(
      toFile: certPath, atomically: true, encoding: .utf8)
    try ca.certificatePEM.write(toFile: caPath, atomically: true, encoding: .utf8)
  }

  func mqttArguments(_ broker: MosquittoBroker) -> [String] {
    ["-h", "127.0.0.1", "-p", String(broker.port), "--cafile", caPath, "--cert", certPath, "--file", keyPath]
  }
}

@Suite("edgekey --crl-url: the CA's CRL from the RA, for the broker's chain")
struct CRLURLTests {
  @Test(
    "the agent refreshes the CRL while it runs: after the broker's certificate is revoked it does not reconnect to it")
  func agentRefreshesTheCRL() throws {
    let f = try Fleet(raArguments: ["--crl-validity", "4s"])
    #expect(try f.enroll(commonName: "crl-agent").status == 0)
    let server = try f.ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: f.ca.certificatePEM)
    let log = f.path("agent.log")
    let agent = try ChildProcess(
      try edgekeyBinary(),
      [
        "agent", "--state", f.state, "--server", f.ra.localhostURL, "--cafile", f.caFile, "-h", "127.0.0.1", "-p",
        String(broker.port), "--tcti", f.swtpm.tcti, "-t", "devices/crl-agent/t", "--interval", "0.5", "--crl-url",
        f.ra.localhostURL + "/crl", "-v",
      ], logPath: log, environment: f.environment)
    func waitFor(_ what: String, in path: String) -> Bool {
      let deadline = Date().addingTimeInterval(40)
      while Date() < deadline && agent.isRunning {
        if let text = try? String(contentsOfFile: path, encoding: .utf8), text.contains(what) { return true }
        usleep(100_000)
      }
      return false
    }
    #expect(waitFor("\"state\":\"connected\"", in: f.state + "/status.json"))
    #expect(FileManager.default.fileExists(atPath: f.state + "/crl.pem"), "the CRL is kept in the state directory")
    let serial = try Command.run("openssl", ["x509", "-noout", "-serial"], input: Data(server.certificate.utf8))
      .trimmingCharacters(in: .whitespacesAndNewlines).replacingOccurrences(of: "serial=", with: "")
    #expect(try f.ra.admin(["revoke", "--serial", serial, "--external"]).status == 0)
    #expect(waitFor("1 revoked", in: log), "the agent fetched the new CRL")
    // The connection in place stays; the next one checks the broker against the new CRL.
    broker.stop()
    try broker.start()
    #expect(waitFor("certificate revoked", in: f.state + "/status.json"))
    agent.send(SIGTERM)
    #expect(agent.wait() == 0)
  }

  @Test("a broker whose certificate the operator revokes is refused by edgekey pub --crl-url, and the layer named")
  func revokedBrokerIsRefused() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "crl-1").status == 0)
    let server = try f.ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: f.ca.certificatePEM)
    let pub = [
      "pub", "-h", "127.0.0.1", "-p", String(broker.port), "--cafile", f.caFile, "--cert", f.state + "/current.pem",
      "--file", f.state + "/current.pem", "--tcti", f.swtpm.tcti, "-t", "devices/crl-1/t", "-m", "x", "-q", "1",
      "--timeout", "3", "--crl-url", f.ra.localhostURL + "/crl",
    ]
    let before = try Command.runCapturing(try edgekeyBinary(), pub, environment: f.environment)
    #expect(before.status == 0, "\(before.stderr)")
    let serial = try Command.run("openssl", ["x509", "-noout", "-serial"], input: Data(server.certificate.utf8))
      .trimmingCharacters(in: .whitespacesAndNewlines).replacingOccurrences(of: "serial=", with: "")
    let revoked = try f.ra.admin(["revoke", "--serial", serial, "--external", "--reason", "keyCompromise"])
    #expect(revoked.status == 0, "\(revoked.output)")
    // The RA makes a new CRL within a second of the revocation; until then the old one is served.
    var after = before
    let deadline = Date().addingTimeInterval(30)
    while after.status == 0 && Date() < deadline {
      usleep(200_000)
      after = try Command.runCapturing(try edgekeyBinary(), pub, environment: f.environment)
    }
    #expect(after.status == 1)
    #expect(after.stderr.contains("server certificate"), "\(after.stderr)")
    #expect(after.stderr.contains("revoked"), "\(after.stderr)")
    // A CRL URL that does not answer a CRL is a failure that says so, before any connection.
    let wrong = try Command.runCapturing(
      try edgekeyBinary(), Array(pub.dropLast()) + [f.ra.localhostURL + "/nothing"], environment: f.environment)
    #expect(wrong.status == 1)
    #expect(wrong.stderr.contains("--crl-url"), "\(wrong.stderr)")
  }
}

@Suite("edgekey pub: killed mid-stream, restarted, nothing accepted is lost", .serialized)
struct PublisherKillTests {
  @Test(
    "SIGKILL at 100 random instants of a QoS 1 stream into one outbox, from 1 and from 8 publishers; the next run delivers all accepted"
  )
  func killAndRestart() async throws {
    // On a thread of its own: it blocks for long (see onOwnThread).
    try await onOwnThread {
      let swtpm = try SoftwareTPM()
      let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-cli-\(UUID().uuidString)")
      try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
      defer { try? FileManager.default.removeItem(at: dir) }
      var env = ProcessInfo.processInfo.environment
      env["EDGEKEY_TCTI"] = swtpm.tcti
      env["TPM2TOOLS_TCTI"] = nil
      let binary = try edgekeyBinary()
      let ca = try TestCA()
      let device = try CLIDevice(in: dir, swtpm: swtpm, ca: ca, commonName: "device-kill") {
        try Command.runCapturing(binary, $0, environment: env).status
      }
      let server = try ca.issueServer()
      let broker = try MosquittoBroker(
        certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: ca.certificatePEM)
      // An independent subscriber: mosquitto_sub with a software key.
      let sinkIdentity = try ca.issueSoftwareClient(commonName: "sink-kill")
      defer { EVP_PKEY_free(sinkIdentity.key) }
      let sinkCert = dir.appendingPathComponent("sink.pem").path
      let sinkKey = dir.appendingPathComponent("sink.key").path
      try sinkIdentity.certificate.write(toFile: sinkCert, atomically: true, encoding: .utf8)
      try TestCA.privateKeyPEM(sinkIdentity.key).write(toFile: sinkKey, atomically: true, encoding: .utf8)
      let sinkLog = dir.appendingPathComponent("sink.log").path
      let sink = try ChildProcess(
        try #require(findExecutable("mosquitto_sub")),
        [
          "-h", "127.0.0.1", "-p", String(broker.port), "--cafile", device.caPath, "--cert", sinkCert, "--key", sinkKey,
          "-t", "devices/#", "-q", "1", "-v",
        ], logPath: sinkLog)
      defer { sink.stop() }
      let deadline = Date().addingTimeInterval(10)
      while !broker.log.contains("Received SUBSCRIBE from sink-kill") && Date() < deadline { usleep(50_000) }

      // One device, one outbox, killed 100 times at random instants: while starting, loading the
      // key, handshaking, appending to the outbox (SQLite WAL) or publishing. Each run delivers
      // what the runs before it left, then adds 30 messages of its own.
      let outbox = dir.appendingPathComponent("outbox.db").path
      var accepted = Set<String>()
      var killedWhileRunning = 0
      for trial in 0..<100 {
        let publishLog = dir.appendingPathComponent("pub-\(trial).log").path
        let publisher = try ChildProcess(
          binary,
          ["pub"] + device.mqttArguments(broker) + [
            "-t", "devices/device-kill/t", "-q", "1", "--count", "60", "--prefix", "t\(trial)-", "--interval-ms", "2",
            "--print-accepted", "--outbox", outbox,
            // Every other run publishes from 8 tasks at once: killed during group commits too.
            "--publishers", trial % 2 == 0 ? "1" : "8",
          ], logPath: publishLog, environment: env)
        usleep(UInt32.random(in: 0...250_000))
        if publisher.isRunning { killedWhileRunning += 1 }
        publisher.kill9()
        let lines = ((try? String(contentsOfFile: publishLog, encoding: .utf8)) ?? "").split(separator: "\n")
        #expect(!lines.contains { $0.contains("damaged") || $0.contains("malformed") }, "\(lines.suffix(3))")
        accepted.formUnion(lines.filter { $0.hasPrefix("accepted ") }.map { String($0.dropFirst("accepted ".count)) })
      }
      // The next run finds the outbox and delivers what is left, then exits.
      let drain = try Command.runCapturing(
        binary, ["pub"] + device.mqttArguments(broker) + ["-t", "devices/device-kill/t", "--outbox", outbox],
        environment: env)
      #expect(drain.status == 0, "\(drain.stderr)")
      #expect(killedWhileRunning >= 50, "most kills must land while the publisher runs")
      var received = Set<String>()
      let until = Date().addingTimeInterval(15)
      while Date() < until {
        let text = (try? String(contentsOfFile: sinkLog, encoding: .utf8)) ?? ""
        received = Set(
          text.split(separator: "\n").compactMap { $0.split(separator: " ", maxSplits: 1).last.map(String.init) })
        if accepted.isSubset(of: received) { break }
        usleep(100_000)
      }
      let missing = accepted.subtracting(received)
      #expect(!accepted.isEmpty)
      #expect(
        missing.isEmpty,
        "\(missing.count) of \(accepted.count) accepted messages never arrived: \(missing.sorted().prefix(5))")
      print(
        "publisher kill report: 100 SIGKILLs (\(killedWhileRunning) while running), accepted \(accepted.count), lost \(missing.count)"
      )
    }
  }
}

/// The DER inside a PEM text (first block).
enum PEMText {
  static func decode(_ text: String) -> [UInt8]? {
    let body = text.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
    return Data(base64Encoded: body).map { [UInt8]($0) }
  }
}

/// Runs `script` (bash, with `args` as $1...) in a mount namespace of its own, where it may mount
/// a small tmpfs: a disk that really fills (ENOSPC from the kernel), for one process tree only.
func inPrivateMounts(_ script: String, _ args: [String], environment: [String: String]) throws -> (
  status: Int32, stdout: String, stderr: String
) {
  let unshare = try #require(findExecutable("unshare"))
  return try Command.runCapturing(
    unshare, (getuid() == 0 ? ["--mount"] : ["--map-root-user", "--mount"]) + ["bash", "-c", script, "bash"] + args,
    environment: environment)
}

@Suite("a full disk: the credential store and the outbox keep their state and say why", .serialized)
struct DiskFullTests {
  /// $1 mount point, $2 state directory to copy in, $3 where to copy it back, $4 pages left
  /// free, then the edgekey command (its --state is the copy on the tmpfs).
  static let renewOnFullDisk = """
    set -u
    M=$1 SRC=$2 OUT=$3 FREE=$4; shift 4
    mount -t tmpfs -o size=256k,mode=0700 tmpfs "$M" || exit 90
    cp -a "$SRC" "$M/state"
    dd if=/dev/zero of="$M/fill" bs=4096 2>/dev/null
    size=$(stat -c %s "$M/fill"); keep=$((size - FREE * 4096)); [ $keep -lt 0 ] && keep=0
    truncate -s $keep "$M/fill"
    "$@" --state "$M/state"; rc=$?
    cp -a "$M/state" "$OUT"
    exit $rc
    """

  @Test(
    "renewal with the disk full at each point: the old credential stays, the error says no space, the next renewal works"
  )
  func renewal() throws {
    let fleet = try Fleet()
    #expect(try fleet.enroll(commonName: "device-full").status == 0)
    let original = try String(contentsOfFile: fleet.state + "/current.pem", encoding: .utf8)
    let binary = try edgekeyBinary()
    var outcomes: [String] = []
    for free in 0..<5 {
      let mount = fleet.path("mnt-\(free)")
      let out = fleet.path("out-\(free)")
      try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
      let renew = [binary, "renew", "--server", fleet.ra.localhostURL, "--cafile", fleet.caFile, "--force"]
      let result = try inPrivateMounts(
        Self.renewOnFullDisk, [mount, fleet.state, out, String(free)] + renew, environment: fleet.environment)
      #expect(result.status != 90, "tmpfs could not be mounted: \(result.stderr)")
      let current = try String(contentsOfFile: out + "/current.pem", encoding: .utf8)
      let pending = FileManager.default.fileExists(atPath: out + "/next.pem")
      if result.status == 0 {
        #expect(current != original)
        outcomes.append("\(free) free pages: renewed")
      } else {
        #expect(result.stderr.contains("No space left on device"), "\(result.stderr)")
        #expect(current == original, "the old credential was damaged with \(free) free pages")
        outcomes.append("\(free) free pages: refused\(pending ? " after the new key was stored" : "")")
      }
      // Whatever happened, the state directory works: status reads it, and a renewal with
      // room succeeds (reusing a key left waiting in next.pem).
      let status = try Command.runCapturing(
        binary, ["status", "--state", out, "--json"], environment: fleet.environment)
      #expect(status.status == 0, "\(status.stderr)")
      let again = try Command.runCapturing(
        binary, ["renew", "--state", out, "--server", fleet.ra.localhostURL, "--cafile", fleet.caFile, "--force"],
        environment: fleet.environment)
      #expect(again.status == 0, "\(again.stderr)")
    }
    print("disk full during renewal: " + outcomes.joined(separator: "; "))
    #expect(outcomes.contains { $0.hasSuffix("after the new key was stored") }, "no case hit the certificate write")
    #expect(outcomes.contains { $0.hasSuffix("renewed") }, "no case had room enough")
  }

  /// $1 mount point, $2 where to copy the outbox back, then the edgekey pub arguments (before
  /// --outbox, --count and --prefix).
  static let publishOnFullDisk = """
    set -u
    M=$1 OUT=$2; shift 2
    mount -t tmpfs -o size=1m,mode=0700 tmpfs "$M" || exit 90
    "$@" --outbox "$M/outbox.db" --count 30 --prefix a- > "$OUT.first" 2>&1
    dd if=/dev/zero of="$M/fill" bs=4096 2>/dev/null
    "$@" --outbox "$M/outbox.db" --count 3000 --prefix b- > "$OUT.second" 2>&1; rc=$?
    mkdir -p "$OUT"; cp -a "$M"/outbox.db* "$OUT/"
    exit $rc
    """

  @Test("an outbox append on a full disk fails with the reason; every message accepted before is still there")
  func outbox() throws {
    let fleet = try Fleet()
    let binary = try edgekeyBinary()
    let device = try CLIDevice(in: fleet.dir, swtpm: fleet.swtpm, ca: fleet.ca, commonName: "device-outbox") {
      try Command.runCapturing(binary, $0, environment: fleet.environment).status
    }
    let closed = try PortFinder.freePair()  // no broker: everything stays in the outbox
    let mount = fleet.path("mnt")
    let out = fleet.path("outbox-copy")
    try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
    let pub =
      [binary, "pub", "-h", "127.0.0.1", "-p", String(closed), "--cafile", device.caPath, "--cert", device.certPath]
      + ["--file", device.keyPath, "-t", "devices/device-outbox/t", "-q", "1", "--print-accepted", "--timeout", "1"]
    let result = try inPrivateMounts(Self.publishOnFullDisk, [mount, out] + pub, environment: fleet.environment)
    #expect(result.status != 90, "tmpfs could not be mounted: \(result.stderr)")
    let first = try String(contentsOfFile: out + ".first", encoding: .utf8)
    let second = try String(contentsOfFile: out + ".second", encoding: .utf8)
    func accepted(_ text: String) -> [String] {
      text.split(separator: "\n").filter { $0.hasPrefix("accepted ") }.map { String($0.dropFirst(9)) }
    }
    #expect(accepted(first).count == 30)
    #expect(result.status != 0)
    #expect(second.contains("disk is full") || second.contains("No space left"), "\(second.suffix(300))")
    #expect(accepted(second).count < 3000)
    // The copy of the outbox holds exactly what was accepted, in order.
    let outbox = try Outbox(path: out + "/outbox.db")
    let stored = try outbox.next(after: 0, limit: 10_000).messages.map { String(decoding: $0.payload, as: UTF8.self) }
    #expect(stored == accepted(first) + accepted(second))
    print(
      "disk full during outbox appends: \(accepted(first).count) + \(accepted(second).count) accepted, \(stored.count) kept"
    )
  }
}

@Suite("a skewed clock at boot: the edgekey process under libfaketime, everything else on real time")
struct ClockSkewTests {
  func underFakeTime(_ offset: String, _ args: [String], _ fleet: Fleet) throws -> (
    status: Int32, stdout: String, stderr: String
  ) {
    let faketime = try #require(findExecutable("faketime"), "faketime is installed by scripts/install-deps")
    return try Command.runCapturing(
      faketime, ["-f", offset, try edgekeyBinary()] + args, environment: fleet.environment)
  }

  @Test(
    "a clock two days behind our certificate: renewal refused with the reason, nothing changed; no connection tried")
  func behind() throws {
    let fleet = try Fleet()
    #expect(try fleet.enroll(commonName: "device-behind").status == 0)
    let before = try String(contentsOfFile: fleet.state + "/current.pem", encoding: .utf8)
    let renew = try underFakeTime(
      "-2d", ["renew", "--state", fleet.state, "--server", fleet.ra.localhostURL, "--cafile", fleet.caFile, "--force"],
      fleet)
    #expect(renew.status == 1)
    #expect(renew.stderr.contains("before our certificate was issued"), "\(renew.stderr)")
    #expect(try String(contentsOfFile: fleet.state + "/current.pem", encoding: .utf8) == before)
    #expect(!FileManager.default.fileExists(atPath: fleet.state + "/next.pem"), "no key was made")
    #expect(fleet.ra.issuanceLog.count == 1, "the RA was not asked")
    // The same clock, connecting: our certificate is not yet valid, said before any network.
    let doctor = try underFakeTime(
      "-2d",
      [
        "doctor", "--host", "127.0.0.1", "--port", String(fleet.broker.port), "--cafile", fleet.caFile, "--cert",
        fleet.state + "/current.pem", "--file", fleet.state + "/current.pem",
      ], fleet)
    #expect(doctor.status == 1)
    #expect(doctor.stdout.contains("✗ our certificate"), "\(doctor.stdout)\(doctor.stderr)")
    #expect(doctor.stdout.contains("is not valid before") && doctor.stdout.contains("check the clock"))
  }

  @Test("expired at boot (off longer than the certificate lived): renew falls back to the password and recovers")
  func expiredAtBoot() throws {
    let fleet = try Fleet(lifetime: "3s", backdate: "0")
    #expect(try fleet.enroll(commonName: "device-expired").status == 0)
    let before = try String(contentsOfFile: fleet.state + "/current.pem", encoding: .utf8)
    Thread.sleep(forTimeInterval: 4)
    let renewArguments = ["renew", "--state", fleet.state, "--server", fleet.ra.localhostURL, "--cafile", fleet.caFile]
    // Without a way to authenticate but the expired certificate: refused, with the reason.
    let stuck = try Command.runCapturing(try edgekeyBinary(), renewArguments, environment: fleet.environment)
    #expect(stuck.status == 1)
    #expect(stuck.stderr.contains("the certificate expired and there is no valid bootstrap credential or password"))
    #expect(try String(contentsOfFile: fleet.state + "/current.pem", encoding: .utf8) == before)
    let renew = try Command.runCapturing(
      try edgekeyBinary(), renewArguments + ["--password-env", "EST_PASSWORD"], environment: fleet.environment)
    #expect(renew.status == 0, "\(renew.stderr)")
    #expect(try String(contentsOfFile: fleet.state + "/current.pem", encoding: .utf8) != before)
    // A clock forty days ahead sees even the new certificate as expired: it says so and keeps it.
    let ahead = try underFakeTime(
      "+40d", ["renew", "--state", fleet.state, "--server", fleet.ra.localhostURL, "--cafile", fleet.caFile], fleet)
    #expect(ahead.status == 1)
    #expect(ahead.stderr.contains("expired") || ahead.stderr.contains("not valid"), "\(ahead.stderr)")
    #expect(FileManager.default.fileExists(atPath: fleet.state + "/current.pem"))
  }
}

/// `edgekey pub` and `sub` given what mosquitto_pub and mosquitto_sub are given: bytes that are not
/// UTF-8, every byte value in a payload, filters that are not filters, a last will, a session that
/// outlives the connection. An independent mosquitto_sub reads what arrived.
@Suite("edgekey pub and sub: input passes unchanged, bad input is a usage error")
struct CLIInputTests {
  /// A subscriber's identity for mosquitto_sub: certificate and key files from the fleet's CA.
  func subscriberFiles(_ f: Fleet, _ name: String) throws -> (cert: String, key: String) {
    let issued = try f.ca.issueSoftwareClient(commonName: name)
    defer { EVP_PKEY_free(issued.key) }
    let cert = f.path("\(name).pem")
    let key = f.path("\(name).key")
    try issued.certificate.write(toFile: cert, atomically: true, encoding: .utf8)
    try TestCA.privateKeyPEM(issued.key).write(toFile: key, atomically: true, encoding: .utf8)
    return (cert, key)
  }

  /// Runs `script` under /bin/sh with $EDGEKEY set to the binary: argv bytes that are not UTF-8
  /// can be made with printf there, where Foundation's Process only takes Swift strings.
  func shell(_ f: Fleet, _ script: String) throws -> (status: Int32, stdout: String, stderr: String) {
    var env = f.environment
    env["EDGEKEY"] = try edgekeyBinary()
    return try Command.runCapturing("/bin/sh", ["-c", script], environment: env, in: f.dir)
  }

  /// `edgekey pub` to the fleet's broker with the enrolled device's credential, plus `extra`.
  func pub(_ f: Fleet, _ extra: String) -> String {
    "\"$EDGEKEY\" pub -h 127.0.0.1 -p \(f.broker.port) --cafile \(f.caFile) --cert \(f.state)/current.pem "
      + "--file \(f.state)/current.pem --tcti '\(f.swtpm.tcti)' \(extra)"
  }

  /// The retained message on `topic`, exactly as mosquitto_sub receives it.
  func retained(_ f: Fleet, _ topic: String, _ sink: (cert: String, key: String)) throws -> [UInt8] {
    let out = f.path("received-\(UUID().uuidString).bin")
    let got = try shell(
      f,
      "mosquitto_sub -h 127.0.0.1 -p \(f.broker.port) --cafile \(f.caFile) --cert \(sink.cert) --key \(sink.key) "
        + "-t '\(topic)' -C 1 -N -W 20 > \(out)")
    #expect(got.status == 0, "\(got.stderr)")
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
  }

  @Test("payloads are bytes: all 256 values by -f and -s, 1-255 by -m, lines by -l, as mosquitto_sub receives them")
  func payloadsPassUnchanged() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "bytes-1").status == 0)
    let sink = try subscriberFiles(f, "sink-bytes")
    let all = (0...255).map { UInt8($0) }
    try Data(all).write(to: URL(fileURLWithPath: f.path("all.bin")))
    let fromFile = try shell(f, pub(f, "-t devices/bytes-1/file -r -f \(f.path("all.bin"))"))
    #expect(fromFile.status == 0, "\(fromFile.stderr)")
    #expect(try retained(f, "devices/bytes-1/file", sink) == all)
    let fromStdin = try shell(f, pub(f, "-t devices/bytes-1/stdin -r -s < \(f.path("all.bin"))"))
    #expect(fromStdin.status == 0, "\(fromStdin.stderr)")
    #expect(try retained(f, "devices/bytes-1/stdin", sink) == all)
    // argv cannot hold NUL: every other byte value, made by printf, through -m.
    let octal = (1...255).map { "\\" + String($0, radix: 8) }.joined()
    let fromArgument = try shell(f, pub(f, "-t devices/bytes-1/arg -r -m \"$(printf '\(octal)')\""))
    #expect(fromArgument.status == 0, "\(fromArgument.stderr)")
    // $(...) drops trailing newlines, and there is a 0x0A in the middle: compare with what sh made.
    let expected = Array(1...255).map { UInt8($0) }
    #expect(try retained(f, "devices/bytes-1/arg", sink) == expected)
    // -l: one message per line, the bytes of each line unchanged.
    try Data([0xFF, 0xFE, 0x80, 0x0A, 0x41, 0xC3]).write(to: URL(fileURLWithPath: f.path("lines.bin")))
    let fromLines = try shell(f, pub(f, "-t devices/bytes-1/line -r -l < \(f.path("lines.bin"))"))
    #expect(fromLines.status == 0, "\(fromLines.stderr)")
    #expect(try retained(f, "devices/bytes-1/line", sink) == [0x41, 0xC3], "the last line is the retained one")
  }

  @Test("a topic that is not UTF-8, or a filter that is not a filter, is a usage error before connecting")
  func badTopicsAreUsageErrors() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "bytes-2").status == 0)
    let notUTF8 = try shell(f, pub(f, "-t \"$(printf 'devices/\\377\\376/x')\" -m hello"))
    #expect(notUTF8.status == 2, "\(notUTF8.stderr)")
    #expect(notUTF8.stderr.contains("not valid UTF-8"))
    let wildcard = try shell(f, pub(f, "-t 'devices/+/x' -m hello"))
    #expect(wildcard.status == 2, "\(wildcard.stderr)")
    // No broker at this port: a usage error comes before any connection is tried.
    let port = try PortFinder.free()
    let filter = try shell(
      f,
      "\"$EDGEKEY\" sub -h 127.0.0.1 -p \(port) --cafile \(f.caFile) --cert \(f.state)/current.pem "
        + "--file \(f.state)/current.pem --tcti '\(f.swtpm.tcti)' -t 'a/#/b'")
    #expect(filter.status == 2, "\(filter.stderr)")
    #expect(filter.stderr.contains("not a subscription filter"))
    #expect(!filter.stderr.contains("refused"))
    // An option a command does not read is a usage error, not silently ignored.
    let stray = try shell(f, pub(f, "-t devices/bytes-2/x -m hi --renew-at 0.5"))
    #expect(stray.status == 2)
    #expect(stray.stderr.contains("--renew-at is not an option of `edgekey pub`"))
  }

  @Test("a last will: the broker publishes it when edgekey sub vanishes without a DISCONNECT")
  func lastWill() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "will-1").status == 0)
    let sink = try subscriberFiles(f, "sink-will")
    let sub = try ChildProcess(
      try edgekeyBinary(),
      [
        "sub", "-h", "127.0.0.1", "-p", String(f.broker.port), "--cafile", f.caFile, "--cert", f.state + "/current.pem",
        "--file", f.state + "/current.pem", "--tcti", f.swtpm.tcti, "-t", "devices/will-1/in", "--will-topic",
        "devices/will-1/status", "--will-payload", "offline", "--will-retain", "-V", "311",
      ], logPath: f.path("sub.log"), environment: f.environment)
    let deadline = Date().addingTimeInterval(20)
    while !f.broker.log.contains("will-1") && Date() < deadline && sub.isRunning { usleep(50_000) }
    #expect(f.broker.log.contains("will-1"), "the subscriber connected")
    sub.kill9()
    #expect(try retained(f, "devices/will-1/status", sink) == Array("offline".utf8))
  }

  @Test("--disable-clean-session: a QoS 1 message sent while the subscriber was away arrives when it is back")
  func persistentSession() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "sess-1").status == 0)
    // Its own client id: the publisher is "sess-1" (the certificate's CN), whose clean connect
    // would end a session of the same id.
    let subscribe = [
      "sub", "-h", "127.0.0.1", "-p", String(f.broker.port), "--cafile", f.caFile, "--cert", f.state + "/current.pem",
      "--file", f.state + "/current.pem", "--tcti", f.swtpm.tcti, "-t", "devices/sess-1/cmd", "-q", "1", "-i",
      "sess-1-sub", "--disable-clean-session", "--count", "1", "--timeout", "20",
    ]
    let first = try ChildProcess(
      try edgekeyBinary(), subscribe, logPath: f.path("first.log"), environment: f.environment)
    let deadline = Date().addingTimeInterval(30)
    while !f.broker.log.contains("Sending SUBACK to sess-1-sub") && Date() < deadline && first.isRunning {
      usleep(50_000)
    }
    #expect(try shell(f, pub(f, "-t devices/sess-1/cmd -q 1 -m first")).status == 0)
    while first.isRunning && Date() < deadline { usleep(50_000) }
    #expect(first.exitCode == 0)
    #expect(try String(contentsOfFile: f.path("first.log"), encoding: .utf8) == "devices/sess-1/cmd first\n")
    // Offline: the broker keeps this for the session.
    #expect(try shell(f, pub(f, "-t devices/sess-1/cmd -q 1 -m while-away")).status == 0)
    let second = try Command.runCapturing(try edgekeyBinary(), subscribe, environment: f.environment)
    #expect(second.status == 0, "\(second.stderr)")
    #expect(second.stdout == "devices/sess-1/cmd while-away\n")
    // The same over MQTT 5, with the session expiry interval mosquitto_sub's -x sends.
    let v5 = subscribe.map { $0 == "sess-1-sub" ? "sess-1-sub5" : $0 } + ["-V", "5", "-x", "300"]
    let third = try ChildProcess(try edgekeyBinary(), v5, logPath: f.path("third.log"), environment: f.environment)
    while !f.broker.log.contains("Sending SUBACK to sess-1-sub5") && Date() < deadline && third.isRunning {
      usleep(50_000)
    }
    #expect(try shell(f, pub(f, "-t devices/sess-1/cmd -q 1 -m v5-first")).status == 0)
    while third.isRunning && Date() < deadline { usleep(50_000) }
    #expect(try String(contentsOfFile: f.path("third.log"), encoding: .utf8) == "devices/sess-1/cmd v5-first\n")
    #expect(try shell(f, pub(f, "-t devices/sess-1/cmd -q 1 -m v5-while-away")).status == 0)
    let fourth = try Command.runCapturing(try edgekeyBinary(), v5, environment: f.environment)
    #expect(fourth.status == 0, "\(fourth.stderr)")
    #expect(fourth.stdout == "devices/sess-1/cmd v5-while-away\n")
    let bad = try Command.runCapturing(try edgekeyBinary(), v5 + ["-x", "soon"], environment: f.environment)
    #expect(bad.status == 2)
  }
}

/// The example daemon (`Examples/TelemetryDaemon`, on the `EdgeKey` facade), as a user runs it.
@Suite("the example telemetry daemon on the facade")
struct ExampleDaemonTests {
  func write(_ f: Fleet, _ extra: [String] = []) throws -> String {
    let file = f.path("telemetry.conf")
    try
      ([
        "state = \(f.state)", "server = \(f.ra.localhostURL)", "cafile = \(f.caFile)", "host = 127.0.0.1",
        "port = \(f.broker.port)", "password-env = EST_PASSWORD", "subject = CN=device-77",
        "metrics-file = \(f.path("edgekey.prom"))",
      ] + extra).joined(separator: "\n").write(toFile: file, atomically: true, encoding: .utf8)
    return file
  }

  /// `mosquitto_sub`/`mosquitto_pub` as an operator's client (a software certificate of the CA).
  func operatorClient(_ f: Fleet) throws -> [String] {
    let identity = try f.ca.issueSoftwareClient(commonName: "operator")
    defer { EVP_PKEY_free(identity.key) }
    let cert = f.path("operator.pem")
    let key = f.path("operator.key")
    try identity.certificate.write(toFile: cert, atomically: true, encoding: .utf8)
    try TestCA.privateKeyPEM(identity.key).write(toFile: key, atomically: true, encoding: .utf8)
    return ["-h", "127.0.0.1", "-p", String(f.broker.port), "--cafile", f.caFile, "--cert", cert, "--key", key]
  }

  @Test(
    "started with an expired certificate it enrolls again, publishes telemetry, answers a command, stops on SIGTERM")
  func expiredCommandAndStop() throws {
    let f = try Fleet(lifetime: "2s")
    #expect(try f.enroll(commonName: "device-77").status == 0)
    // Wait for the event (the certificate's expiry), not a fixed time.
    let store = try CredentialStore(directory: f.state)
    let notAfter = try #require(try store.read(.current)?.certificate?.notAfter)
    while Date() <= notAfter { usleep(50_000) }
    var environment = f.environment
    environment["INTERVAL"] = "1"
    let log = f.path("daemon.log")
    let daemon = try ChildProcess(
      try builtExecutable("edgekey-telemetry"), [try write(f)], logPath: log, environment: environment)
    defer { daemon.stop() }
    let client = try operatorClient(f)
    // Its telemetry arrives: it enrolled anew (the old certificate had expired) and connected.
    let telemetry = try Command.runCapturing(
      "mosquitto_sub", client + ["-t", "devices/device-77/telemetry", "-C", "1", "-W", "60", "-i", "op-telemetry"])
    #expect(
      telemetry.stdout.contains("\"reading\""),
      "\(telemetry.stderr) \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    #expect(
      try store.read(.current)?.certificate?.isValid() == true
        || (try store.read(.current)?.certificate?.notAfter ?? .distantPast) > notAfter)
    // A command on its topic is answered on the reply topic.
    let replies = try ChildProcess(
      "/usr/bin/mosquitto_sub",
      client + ["-t", "devices/device-77/replies", "-C", "1", "-W", "60", "-i", "op-replies"],
      logPath: f.path("replies.log"))
    var answered = false
    for _ in 0..<600 where !answered {
      // Published until the subscriber has it (its subscription may not be in place yet).
      _ = try Command.runCapturing(
        "mosquitto_pub", client + ["-t", "devices/device-77/commands/reboot", "-m", "reboot", "-i", "op-pub"])
      let seen = (try? String(contentsOfFile: f.path("replies.log"), encoding: .utf8)) ?? ""
      answered = seen.contains("done: reboot")
      if !answered { usleep(100_000) }
    }
    #expect(answered, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    replies.stop()
    // SIGTERM: a clean stop, exit 0; the metrics file was written.
    daemon.send(SIGTERM)
    #expect(daemon.wait() == 0, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    let metrics = try String(contentsOfFile: f.path("edgekey.prom"), encoding: .utf8)
    // It started on an expired certificate: one enrollment by the fallback credential.
    #expect(metrics.contains("edgekey_renewal_bootstrap_fallbacks_total 1"), "\(metrics)")
    #expect(metrics.contains("edgekey_mqtt_"), "the connection's counters too: \(metrics)")
    #expect(metrics.hasSuffix("# EOF\n"))
  }

  @Test("SIGTERM while the enrollment server makes it wait (202, Retry-After 60) stops it within about a second")
  func stopDuringPendingWait() throws {
    let f = try Fleet(raArguments: ["--pending", "100", "--retry-after", "60"])
    let log = f.path("daemon.log")
    let daemon = try ChildProcess(
      try builtExecutable("edgekey-telemetry"), [try write(f, ["verbose = true"])], logPath: log,
      environment: f.environment)
    defer { daemon.stop() }
    // The event: the EST client's log line for the server's 202 and the wait it starts.
    var waiting = false
    for _ in 0..<1200 where !waiting {
      waiting = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("202, waiting 60 s")
      if !waiting { usleep(50_000) }
    }
    #expect(waiting, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    let sent = Date()
    daemon.send(SIGTERM)
    let status = daemon.wait()
    let took = Date().timeIntervalSince(sent)
    print(
      "example daemon: SIGTERM during a 202 wait (Retry-After 60 s) returned after \(Int(took * 1000)) ms, exit \(status)"
    )
    #expect(status == 0, "a clean stop, not the signal's default action")
    #expect(took < 10, "it did not wait out the server's 60 s")
  }

  /// A unix datagram socket bound at `path`: what systemd listens on for NOTIFY_SOCKET.
  final class NotifySocket {
    let fd: Int32
    init(path: String) throws {
      fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
      var address = sockaddr_un()
      address.sun_family = sa_family_t(AF_UNIX)
      let bytes = Array(path.utf8)
      withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
      let ok = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
      }
      guard fd >= 0, ok == 0 else { throw HarnessError("cannot bind \(path)") }
    }
    deinit { close(fd) }

    /// The next datagram, or nil after `seconds`.
    func next(within seconds: Double) -> String? {
      var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
      guard poll(&p, 1, Int32(seconds * 1000)) == 1 else { return nil }
      var buffer = [UInt8](repeating: 0, count: 4096)
      let n = recv(fd, &buffer, buffer.count, 0)
      return n > 0 ? String(decoding: buffer.prefix(n), as: UTF8.self) : nil
    }
  }

  @Test("under systemd (Type=notify, WatchdogSec=): READY=1 once connected, WATCHDOG=1 pings, STOPPING=1 at SIGTERM")
  func systemdNotifications() throws {
    let f = try Fleet()
    #expect(try f.enroll(commonName: "device-77").status == 0)
    let path = f.path("notify.sock")
    let notify = try NotifySocket(path: path)
    var environment = f.environment
    environment["NOTIFY_SOCKET"] = path
    environment["WATCHDOG_USEC"] = "400000"
    let log = f.path("daemon.log")
    let daemon = try ChildProcess(
      try builtExecutable("edgekey-telemetry"), [try write(f)], logPath: log, environment: environment)
    defer { daemon.stop() }
    var seen: [String] = []
    while seen.filter({ $0 == "WATCHDOG=1" }).count < 2 || !seen.contains(where: { $0.hasPrefix("READY=1") }) {
      guard let message = notify.next(within: 60) else { break }
      seen.append(message)
    }
    #expect(
      seen.contains { $0.hasPrefix("READY=1") }, "\(seen) \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    #expect(seen.filter { $0 == "WATCHDOG=1" }.count >= 2, "\(seen)")
    daemon.send(SIGTERM)
    var stopping = false
    while !stopping, let message = notify.next(within: 30) { stopping = message == "STOPPING=1" }
    #expect(stopping)
    #expect(daemon.wait() == 0)
  }
}
