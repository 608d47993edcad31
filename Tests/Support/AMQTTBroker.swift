import Foundation

/// amqtt (PyPI), a broker that speaks MQTT 3.1.1 only, on a free loopback port over mutual TLS
/// (`Peers/amqtt_mtls.py` makes it require a client certificate). From the virtual environment
/// `scripts/install-deps` makes. Stopped on `deinit`.
public final class AMQTTBroker: @unchecked Sendable {
  public let port: UInt16
  public let directory: URL
  private let process: ChildProcess

  public init(certificatePEM: String, keyPEM: String, clientCAPEM: String) throws {
    let python = PeerFiles.repository.appendingPathComponent(".build-peers/venv/bin/python").path
    guard FileManager.default.isExecutableFile(atPath: python) else {
      throw HarnessError("amqtt is not installed: run scripts/install-deps (it makes .build-peers/venv)")
    }
    let files = try PeerFiles(
      script: "amqtt_mtls.py", prefix: "edgekey-amqtt", certificatePEM: certificatePEM, keyPEM: keyPEM,
      clientCAPEM: clientCAPEM)
    let (dir, script, cert, key, ca) = (files.directory, files.script, files.certificate, files.key, files.clientCA)
    directory = dir
    let log = dir.appendingPathComponent("amqtt.log")
    var lastLog = ""
    for _ in 0..<5 {
      let port = try PortFinder.free()
      let p = try ChildProcess(python, [script, String(port), ca, cert, key], logPath: log.path)
      let deadline = Date().addingTimeInterval(30)
      while p.isRunning && Date() < deadline {
        lastLog = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        if lastLog.contains("ready"), PortFinder.waitUntilListening(port, timeout: 0.1) {
          self.port = port
          self.process = p
          return
        }
        usleep(50_000)
      }
      p.stop()
    }
    throw HarnessError("amqtt did not start: \(lastLog)")
  }

  /// What amqtt logged.
  public var log: String {
    (try? String(contentsOf: directory.appendingPathComponent("amqtt.log"), encoding: .utf8)) ?? ""
  }

  deinit {
    process.stop()
    try? FileManager.default.removeItem(at: directory)
  }
}

/// The files a TLS test peer of ours (`Peers/*.py`) starts from: a fresh directory holding its
/// certificate, key and client CA, and the path of its script.
struct PeerFiles {
  let directory: URL
  let script: String
  let certificate: String
  let key: String
  let clientCA: String

  static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()

  init(script name: String, prefix: String, certificatePEM: String, keyPEM: String, clientCAPEM: String) throws {
    script = PeerFiles.repository.appendingPathComponent("Tests/Support/Peers/\(name)").path
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)")
    directory = dir
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    func write(_ name: String, _ text: String) throws -> String {
      let url = dir.appendingPathComponent(name)
      try text.write(to: url, atomically: true, encoding: .utf8)
      return url.path
    }
    certificate = try write("server.pem", certificatePEM)
    key = try write("server.key", keyPEM)
    clientCA = try write("client-ca.pem", clientCAPEM)
  }
}
