import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A mosquitto broker of the test's own on a free loopback port, with mutual TLS
/// (`require_certificate true`, the certificate's CN as the user name). Stopped on `deinit`.
public final class MosquittoBroker: @unchecked Sendable {
  public let port: UInt16
  public let directory: URL
  private var process: ChildProcess?
  private let arguments: [String]
  private let executable: String

  /// - Parameters:
  ///   - aclFile: an ACL text (`user`/`pattern` lines) enforced by the broker, or nil for none.
  ///   - extraConfig: more configuration lines, e.g. `tls_version tlsv1.2`.
  ///   - persistent: keep sessions and queued messages in a file, saved every second, so that
  ///     a restart (or a kill after the last save) finds them again.
  public init(
    certificatePEM: String, keyPEM: String, chainPEM: String? = nil, clientCAPEM: String, crlPEM: String? = nil,
    aclFile: String? = nil, extraConfig: [String] = [], persistent: Bool = false
  ) throws {
    guard let mosquitto = findExecutable("mosquitto") else {
      throw HarnessError("mosquitto is not installed (apt-get install mosquitto)")
    }
    executable = mosquitto
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-mosquitto-\(UUID().uuidString)")
    directory = dir
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    // mosquitto started as root drops to the `mosquitto` user: it must be able to read these.
    chmod(dir.path, 0o755)
    func write(_ name: String, _ text: String) throws -> String {
      let url = dir.appendingPathComponent(name)
      try text.write(to: url, atomically: true, encoding: .utf8)
      chmod(url.path, 0o644)
      return url.path
    }
    let cert = try write("server.pem", certificatePEM + (chainPEM ?? ""))
    let key = try write("server.key", keyPEM)
    let ca = try write("client-ca.pem", clientCAPEM)
    var config = [
      "per_listener_settings false",
      "allow_anonymous false",
      persistent ? "persistence true" : "persistence false",
      "log_dest file \(try MosquittoBroker.logFile(dir))",
      "log_type all",
      "connection_messages true",
    ]
    if persistent {
      let store = dir.appendingPathComponent("persistence")
      try FileManager.default.createDirectory(at: store, withIntermediateDirectories: true)
      chmod(store.path, 0o777)
      config += ["persistence_location \(store.path)/", "autosave_interval 1"]
    }
    if let aclFile { config.append("acl_file \(try write("acl", aclFile))") }
    let port = try PortFinder.free()
    config += [
      "listener \(port) 127.0.0.1",
      "cafile \(ca)",
      "certfile \(cert)",
      "keyfile \(key)",
      "require_certificate true",
      "use_identity_as_username true",
    ]
    if let crlPEM { config.append("crlfile \(try write("crl.pem", crlPEM))") }
    config += extraConfig
    let configPath = try write("mosquitto.conf", config.joined(separator: "\n") + "\n")
    self.port = port
    arguments = ["-c", configPath]
    try start()
  }

  /// Starts (or restarts) the broker on the same port.
  public func start() throws {
    let p = try ChildProcess(executable, arguments, logPath: directory.appendingPathComponent("stdout.log").path)
    let deadline = Date().addingTimeInterval(10)
    while p.isRunning && Date() < deadline {
      if PortFinder.waitUntilListening(port, timeout: 0.1) {
        process = p
        return
      }
    }
    p.stop()
    throw HarnessError("mosquitto did not start: \(log)")
  }

  /// SIGTERM and wait.
  public func stop() {
    process?.stop()
    process = nil
  }

  /// SIGKILL, as a crash.
  public func kill9() {
    process?.kill9()
    process = nil
  }

  /// Pauses (SIGSTOP) or resumes (SIGCONT) the broker.
  public func pause() { process?.send(SIGSTOP) }
  public func resume() { process?.send(SIGCONT) }

  /// Everything the broker logged (mosquitto flushes its log file line by line).
  public var log: String {
    let files = ["mosquitto.log", "stdout.log"]
    return files.compactMap { try? String(contentsOf: directory.appendingPathComponent($0), encoding: .utf8) }
      .joined()
  }

  /// The log file, created writable for the `mosquitto` user that a root-started broker becomes.
  private static func logFile(_ dir: URL) throws -> String {
    let path = dir.appendingPathComponent("mosquitto.log").path
    guard FileManager.default.createFile(atPath: path, contents: nil) else {
      throw HarnessError("cannot create \(path)")
    }
    chmod(path, 0o666)
    return path
  }

  deinit {
    stop()
    try? FileManager.default.removeItem(at: directory)
  }
}
