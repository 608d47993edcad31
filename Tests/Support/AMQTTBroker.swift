import Foundation

/// amqtt (PyPI), a broker that speaks MQTT 3.1.1 only, on a free loopback port over mutual TLS
/// (`Peers/amqtt_mtls.py` makes it require a client certificate). From the virtual environment
/// `scripts/install-deps` makes. Stopped on `deinit`.
public final class AMQTTBroker: @unchecked Sendable {
  public let port: UInt16
  public let directory: URL
  private let process: ChildProcess

  public init(certificatePEM: String, keyPEM: String, clientCAPEM: String) throws {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent()
    let python = root.appendingPathComponent(".build-peers/venv/bin/python").path
    guard FileManager.default.isExecutableFile(atPath: python) else {
      throw HarnessError("amqtt is not installed: run scripts/install-deps (it makes .build-peers/venv)")
    }
    let script = root.appendingPathComponent("Tests/Support/Peers/amqtt_mtls.py").path
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-amqtt-\(UUID().uuidString)")
    directory = dir
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    func write(_ name: String, _ text: String) throws -> String {
      let url = dir.appendingPathComponent(name)
      try text.write(to: url, atomically: true, encoding: .utf8)
      return url.path
    }
    let cert = try write("server.pem", certificatePEM)
    let key = try write("server.key", keyPEM)
    let ca = try write("client-ca.pem", clientCAPEM)
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
