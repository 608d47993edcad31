import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// tpm2-abrmd, the user-space resource manager, in front of a `SoftwareTPM`: the TPM the way
/// a distribution's `tabrmd` TCTI reaches it. Each broker owns its own D-Bus name on one
/// private session bus shared by the test process, so brokers run in parallel tests.
/// Stopped on `deinit`.
public final class AccessBroker: @unchecked Sendable {
  // @unchecked: immutable after init, apart from the child process it owns.
  public let tpm: SoftwareTPM
  public let busName: String
  /// The private session bus the broker and the tabrmd TCTI meet on.
  public let busAddress: String
  private let process: ChildProcess

  /// The TCTI string for EdgeKey and tpm2-tools.
  public var tcti: String { "tabrmd:bus_name=\(busName),bus_type=session" }

  /// Environment for independent tools talking to the TPM through this broker: the
  /// simulator's, with the TCTI pointed at the broker and the private bus added.
  public var toolEnvironment: [String: String] {
    var env = tpm.toolEnvironment
    env["TPM2TOOLS_TCTI"] = tcti
    env["TPM2OPENSSL_TCTI"] = tcti
    env["DBUS_SESSION_BUS_ADDRESS"] = busAddress
    return env
  }

  public init(over tpm: SoftwareTPM) throws {
    guard let abrmd = findExecutable("tpm2-abrmd") else {
      throw HarnessError("tpm2-abrmd is not installed (apt-get install tpm2-abrmd libtss2-tcti-tabrmd0)")
    }
    let bus = try SessionBus.start()
    self.tpm = tpm
    busAddress = bus.address
    busName = "org.edgekey.Tabrmd.t\(getpid())x\(UInt32.random(in: 0...UInt32.max))"
    var env = ProcessInfo.processInfo.environment
    env["DBUS_SESSION_BUS_ADDRESS"] = bus.address
    let log = tpm.stateDirectory.appendingPathComponent("tpm2-abrmd.log").path
    process = try ChildProcess(
      abrmd, ["--session", "--allow-root", "--dbus-name=\(busName)", "--tcti=\(tpm.tcti)"], logPath: log,
      environment: env)
    let deadline = Date().addingTimeInterval(10)
    while Date() < deadline {
      guard process.isRunning else { break }
      if (try? Command.runCapturing("tpm2_getrandom", ["--hex", "4"], environment: toolEnvironment).status) == 0 {
        return
      }
      usleep(50_000)
    }
    let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
    process.stop()
    throw HarnessError("tpm2-abrmd did not come up on \(busName): \(output)")
  }

  deinit { process.stop() }

  /// Runs an independent tool through the broker and returns its output; throws on failure.
  @discardableResult
  public func run(_ tool: String, _ arguments: [String], in directory: URL? = nil) throws -> String {
    try Command.run(tool, arguments, environment: toolEnvironment, in: directory)
  }
}

/// A private D-Bus session bus for the whole test process, started on first use.
///
/// The tabrmd TCTI finds the session bus only through `DBUS_SESSION_BUS_ADDRESS`, so this sets
/// it in the test process once, before any broker is reached. The bus is killed at exit.
public final class SessionBus: Sendable {
  public let address: String

  private init(address: String) { self.address = address }

  nonisolated(unsafe) private static var instance: SessionBus?
  private static let lock = NSLock()

  /// The bus, started by the first caller.
  @discardableResult
  public static func start() throws -> SessionBus {
    lock.lock()
    defer { lock.unlock() }
    if let instance { return instance }
    guard let daemon = findExecutable("dbus-daemon") else {
      throw HarnessError("dbus-daemon is not installed (apt-get install dbus)")
    }
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-dbus-\(getpid())")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    let socket = dir.appendingPathComponent("bus").path
    let address = "unix:path=\(socket)"
    let child = try ChildProcess(
      daemon, ["--session", "--nofork", "--nopidfile", "--address=\(address)"],
      logPath: dir.appendingPathComponent("dbus.log").path)
    let deadline = Date().addingTimeInterval(5)
    while access(socket, F_OK) != 0 && Date() < deadline && child.isRunning { usleep(10_000) }
    guard access(socket, F_OK) == 0 else { throw HarnessError("dbus-daemon did not start") }
    setenv("DBUS_SESSION_BUS_ADDRESS", address, 1)
    let bus = SessionBus(address: address)
    busPid = child.pid
    atexit { if busPid > 0 { kill(busPid, SIGTERM) } }
    // The child must outlive this scope: the bus lives as long as the process.
    leaked.append(child)
    instance = bus
    return bus
  }

  nonisolated(unsafe) private static var leaked: [ChildProcess] = []
}

nonisolated(unsafe) private var busPid: pid_t = 0
