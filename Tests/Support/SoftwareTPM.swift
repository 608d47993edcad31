import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// Failures of the test harness itself: a missing binary fails the run, never skips it.
public struct HarnessError: Error, CustomStringConvertible {
  public var description: String
  public init(_ description: String) { self.description = description }
}

/// A swtpm process of the test's own, on free loopback ports, with a temporary state
/// directory. Restart it on the same state to simulate a power cycle. Stopped on `deinit`.
public final class SoftwareTPM: @unchecked Sendable {
  // @unchecked: mutated only by the test that owns it, one call at a time.
  public let stateDirectory: URL
  public private(set) var port: UInt16
  private var process: ChildProcess?

  /// The TCTI string for EdgeKey, tpm2-tools (`TPM2TOOLS_TCTI`) and tpm2-openssl.
  public var tcti: String { "swtpm:host=127.0.0.1,port=\(port)" }

  /// Environment for independent tools (tpm2-tools, tpm2-openssl) talking to this TPM.
  public var toolEnvironment: [String: String] {
    var env = ProcessInfo.processInfo.environment
    env["TPM2TOOLS_TCTI"] = tcti
    env["TPM2OPENSSL_TCTI"] = tcti
    env["TSS2_LOG"] = "all+none"
    return env
  }

  /// The manufacturer CA of `init(endorsementCertificates: true)`: swtpm_localca's issuing
  /// certificate and its root, PEM (empty otherwise).
  public private(set) var manufacturerCAPEM = ""

  /// - Parameter endorsementCertificates: manufacture the TPM first with `swtpm_setup
  ///   --create-ek-cert`, its EK certificates signed by a local CA of this test's own
  ///   (`swtpm_localca` configured in a temporary folder): an RSA 2048 EK certificate at
  ///   0x01C00002 and a P-384 one at 0x01C00016, the EKs persisted at 0x81010001 and 0x81010016.
  ///   - manufacturer: with `endorsementCertificates`, use that TPM's manufacturer CA (two
  ///     TPMs of one maker) instead of a new one; it must outlive this one's manufacturing.
  public init(endorsementCertificates: Bool = false, manufacturer: SoftwareTPM? = nil) throws {
    stateDirectory = FileManager.default.temporaryDirectory.appendingPathComponent(
      "edgekey-swtpm-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: stateDirectory, withIntermediateDirectories: true)
    port = 0
    if endorsementCertificates {
      manufacturerCAPEM = try manufacture(
        in: (manufacturer?.stateDirectory ?? stateDirectory).appendingPathComponent("manufacturer-ca"))
    }
    try start()
  }

  /// swtpm_setup with a manufacturer CA in the state directory's sibling folder.
  private func manufacture(in ca: URL) throws -> String {
    try FileManager.default.createDirectory(at: ca, withIntermediateDirectories: true)
    let localca = ca.appendingPathComponent("swtpm-localca.conf")
    try """
    statedir = \(ca.path)
    signingkey = \(ca.path)/signkey.pem
    issuercert = \(ca.path)/issuercert.pem
    certserial = \(ca.path)/certserial

    """.write(to: localca, atomically: true, encoding: .utf8)
    let options = ca.appendingPathComponent("swtpm-localca.options")
    try "--platform-manufacturer EdgeKey\n--platform-version 2.1\n--platform-model swtpm\n".write(
      to: options, atomically: true, encoding: .utf8)
    let setup = ca.appendingPathComponent("swtpm_setup.conf")
    try """
    create_certs_tool = \(findExecutable("swtpm_localca") ?? "/usr/bin/swtpm_localca")
    create_certs_tool_config = \(localca.path)
    create_certs_tool_options = \(options.path)
    active_pcr_banks = sha256

    """.write(to: setup, atomically: true, encoding: .utf8)
    try Command.run(
      "swtpm_setup",
      [
        "--tpm2", "--tpmstate", stateDirectory.path, "--create-ek-cert", "--create-platform-cert", "--config",
        setup.path, "--overwrite",
      ])
    let issuer = try String(contentsOf: ca.appendingPathComponent("issuercert.pem"), encoding: .utf8)
    let root = try String(contentsOf: ca.appendingPathComponent("swtpm-localca-rootca-cert.pem"), encoding: .utf8)
    return issuer + root
  }

  deinit {
    stop()
    try? FileManager.default.removeItem(at: stateDirectory)
  }

  /// Starts swtpm on the current state; picks new ports when the old pair is taken.
  public func start() throws {
    guard let swtpm = findExecutable("swtpm") else {
      throw HarnessError("swtpm is not installed (apt-get install swtpm swtpm-tools)")
    }
    var lastError = "no attempt"
    for _ in 0..<20 {
      if port == 0 || !PortFinder.isFree(port) || !PortFinder.isFree(port + 1) {
        port = try PortFinder.freePair()
      }
      let log = stateDirectory.appendingPathComponent("swtpm.log")
      let p = try ChildProcess(
        swtpm,
        [
          "socket", "--tpm2", "--tpmstate", "dir=\(stateDirectory.path)",
          "--server", "type=tcp,port=\(port),bindaddr=127.0.0.1",
          "--ctrl", "type=tcp,port=\(port + 1),bindaddr=127.0.0.1",
          "--flags", "not-need-init,startup-clear",
        ], logPath: log.path)
      if PortFinder.waitUntilListening(port, timeout: 5), p.isRunning {
        process = p
        return
      }
      p.stop()
      lastError = (try? String(contentsOf: log, encoding: .utf8)) ?? "swtpm exited"
      port = 0
    }
    throw HarnessError("swtpm did not start: \(lastError)")
  }

  /// Stops swtpm (SIGTERM: swtpm saves its state, as at a clean power-down).
  public func stop() {
    process?.stop()
    process = nil
  }

  /// Another TPM in its place (a cleared chip, or the state directory moved to new hardware):
  /// stopped, its state deleted, started fresh on the same ports. Every key blob made by the old
  /// one now fails the integrity check.
  public func replaceWithFresh() throws {
    stop()
    for name in try FileManager.default.contentsOfDirectory(atPath: stateDirectory.path)
    where name != "swtpm.log" {
      try FileManager.default.removeItem(at: stateDirectory.appendingPathComponent(name))
    }
    try start()
  }

  /// Freezes swtpm (SIGSTOP): it accepts connections but answers nothing, as a hung chip
  /// would, until ``resume()``.
  public func pause() { process?.send(SIGSTOP) }

  /// Lets a paused swtpm run again (SIGCONT); it answers the commands queued meanwhile.
  public func resume() { process?.send(SIGCONT) }

  /// A power cycle: stop, start again on the same state and ports. Transient objects are
  /// gone; persistent ones and the seeds remain.
  public func powerCycle() throws {
    stop()
    try start()
  }

  /// Runs an independent tool against this TPM and returns its output; throws on failure.
  @discardableResult
  public func run(_ tool: String, _ arguments: [String], input: Data? = nil, in directory: URL? = nil)
    throws -> String
  {
    try Command.run(tool, arguments, environment: toolEnvironment, input: input, in: directory)
  }
}

/// Runs programs for tests and reports their output.
public enum Command {
  /// Runs `tool` and returns stdout; throws with stdout and stderr when it exits non-zero.
  @discardableResult
  public static func run(
    _ tool: String, _ arguments: [String], environment: [String: String]? = nil, input: Data? = nil,
    in directory: URL? = nil
  ) throws -> String {
    let result = try runCapturing(tool, arguments, environment: environment, input: input, in: directory)
    guard result.status == 0 else {
      throw HarnessError(
        "\(tool) \(arguments.joined(separator: " ")) exited \(result.status)\n\(result.stdout)\n\(result.stderr)")
    }
    return result.stdout
  }

  /// Runs `tool` and returns its exit status and output, whatever the status.
  public static func runCapturing(
    _ tool: String, _ arguments: [String], environment: [String: String]? = nil, input: Data? = nil,
    in directory: URL? = nil
  ) throws -> (status: Int32, stdout: String, stderr: String) {
    guard let path = tool.hasPrefix("/") ? tool : findExecutable(tool) else {
      throw HarnessError("\(tool) is not installed")
    }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = arguments
    if let environment { p.environment = environment }
    if let directory { p.currentDirectoryURL = directory }
    let out = Pipe()
    let err = Pipe()
    let inp = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = inp
    // The child inherits this thread's signal mask, and the test runner's threads block signals:
    // a tool started with SIGCHLD blocked (cmake) waits forever for its own children, one with
    // SIGTERM blocked cannot be stopped. Start it with nothing blocked, as a shell would.
    var everything = sigset_t()
    var saved = sigset_t()
    sigemptyset(&everything)
    pthread_sigmask(SIG_SETMASK, &everything, &saved)
    defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
    try p.run()
    if let input { inp.fileHandleForWriting.write(input) }
    try inp.fileHandleForWriting.close()
    // Read both pipes concurrently so a chatty tool cannot fill one and block.
    nonisolated(unsafe) var errData = Data()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async {
      errData = err.fileHandleForReading.readDataToEndOfFile()
      group.leave()
    }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    p.waitUntilExit()
    return (
      p.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self)
    )
  }
}

/// Finds `name` on PATH.
public func findExecutable(_ name: String) -> String? {
  let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
  let directories: [String] = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/sbin"]
  for dir in directories {
    let candidate = "\(dir)/\(name)"
    if access(candidate, X_OK) == 0 { return candidate }
  }
  return nil
}

/// Free loopback TCP ports.
public enum PortFinder {
  /// Ports handed out in this process: never handed out twice, so that two tests running in
  /// parallel cannot both start a server on the same port before either binds it (the second
  /// would then talk to the first one's swtpm and wait forever behind its connection).
  nonisolated(unsafe) private static var handedOut: Set<UInt16> = []
  private static let lock = NSLock()

  private static func claim(_ ports: [UInt16]) -> Bool {
    lock.lock()
    defer { lock.unlock() }
    guard ports.allSatisfy({ !handedOut.contains($0) }) else { return false }
    handedOut.formUnion(ports)
    return true
  }

  /// A free port below the kernel's ephemeral range (see `freePair`): a port the kernel chose
  /// for us can be handed to one of the outgoing connections (thousands, one per TPM command)
  /// before our server binds it.
  public static func free() throws -> UInt16 {
    harnessIgnoresSIGPIPE
    for _ in 0..<500 {
      let port = UInt16.random(in: range)
      if isFree(port), claim([port]) { return port }
    }
    throw HarnessError("no free loopback port")
  }

  /// The ports this harness hands out; scripts/lib/loopback.sh takes 10000–19999, so that the
  /// shell helpers the tests run cannot race this process for a port.
  static let range: Range<UInt16> = 20000..<32700

  /// A port p with p+1 also free (swtpm's server and control ports). Chosen below the
  /// kernel's ephemeral range, where outgoing connections (the swtpm TCTI opens one per TPM
  /// command) never leave ports in TIME_WAIT, so pairs stay easy to find on a busy machine.
  public static func freePair() throws -> UInt16 {
    for _ in 0..<500 {
      let p = UInt16.random(in: range)
      if isFree(p), isFree(p + 1), claim([p, p + 1]) { return p }
    }
    throw HarnessError("no free pair of loopback ports")
  }

  /// A TCP socket listening on a free loopback port of this harness's range.
  public static func listeningSocket(backlog: Int32 = 16) throws -> (descriptor: Int32, port: UInt16) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    for _ in 0..<20 {
      let candidate = try free()
      var addr = sockaddr_in()
      addr.sin_family = sa_family_t(AF_INET)
      addr.sin_addr.s_addr = inet_addr("127.0.0.1")
      addr.sin_port = candidate.bigEndian
      let bound = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
      }
      if bound == 0, listen(fd, backlog) == 0 { return (fd, candidate) }
    }
    close(fd)
    throw HarnessError("no loopback port to listen on")
  }

  /// True when nothing listens on the port and it can be bound.
  public static func isFree(_ port: UInt16) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    // As the servers do (swtpm, mosquitto, s_server): a port whose last connection lingers in
    // TIME_WAIT is free to listen on.
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = port.bigEndian
    return withUnsafePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
      }
    }
  }

  /// Waits until something accepts connections on the port.
  public static func waitUntilListening(_ port: UInt16, timeout: TimeInterval) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
      let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
      var addr = sockaddr_in()
      addr.sin_family = sa_family_t(AF_INET)
      addr.sin_addr.s_addr = inet_addr("127.0.0.1")
      addr.sin_port = port.bigEndian
      let connected = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
        }
      }
      close(fd)
      if connected { return true }
      usleep(20_000)
    }
    return false
  }
}
