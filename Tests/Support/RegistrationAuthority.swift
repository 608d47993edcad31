import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A binary this package builds (`edgekey`, `edgekey-ra`), from `.build/debug` or `.build/release`.
public func builtExecutable(_ name: String) throws -> String {
  let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
  for configuration in ["debug", "release"] {
    let path = root.appendingPathComponent(".build/\(configuration)/\(name)").path
    if FileManager.default.isExecutableFile(atPath: path) { return path }
  }
  throw HarnessError("\(name) is not built (swift build --build-tests builds it)")
}

/// The project's own registration authority (`edgekey-ra`) on a free loopback port, signing
/// with `ca`, serving TLS with a server certificate from the same CA. Stopped on `deinit`.
public final class RegistrationAuthority: @unchecked Sendable {
  public let port: UInt16
  public let directory: URL
  public let ca: TestCA
  private var process: ChildProcess?
  private let arguments: [String]
  private let executable: String

  /// - Parameters:
  ///   - password: `user:pass`, a shared password that enrols any unused name (with
  ///     `--allow-shared-password --name-pattern '*'`); nil for none (per-device secrets, imported
  ///     with `importManifest`, or bootstrap certificates).
  ///   - bootstrapCA: client certificates from this CA may enroll.
  ///   - lifetime: e.g. "30d", "20s".
  ///   - extraArguments: e.g. `["--pending", "2"]`, `["--tls-max", "1.2"]`.
  ///   - tlsCA: issues the RA's own TLS certificate (default: `ca`).
  ///   - manufacturerCAs: TPM manufacturer CAs (PEM) for `--ek-ca`: attestation is offered.
  ///   - requireAttestation: `--require-attestation`.
  ///   - tpmIssuer: sign with an issuing CA whose key is in a TPM (`--ca-key-tpm`) instead of `ca`'s
  ///     key: its chain (issuing CA first), TSS2 key file and TCTI.
  /// A manifest line for a device enrolling with a one-time secret.
  public static func manifestLine(serial: String, name: String, secret: String) -> String {
    "{\"serial\":\(jsonString(serial)),\"name\":\(jsonString(name)),\"secret\":\(jsonString(secret))}"
  }

  /// Gives a device a new one-time secret (`admin rearm`).
  public func rearm(_ serial: String, secret: String) throws {
    let file = directory.appendingPathComponent("secret-\(UUID().uuidString)")
    try secret.write(to: file, atomically: true, encoding: .utf8)
    let (status, output) = try admin(["rearm", serial, "--secret-file", file.path])
    guard status == 0 else { throw HarnessError("admin rearm failed: \(output)") }
  }

  public init(
    ca: TestCA, password: String? = "device:factory-secret", bootstrapCA: TestCA? = nil, lifetime: String = "30d",
    backdate: String = "60", cacertsPEM: String? = nil, extraArguments: [String] = [], tlsCA: TestCA? = nil,
    tpmIssuer: (chainPEM: String, keyFile: String, tcti: String)? = nil, registryPath: String? = nil,
    manufacturerCAs: [String] = [], requireAttestation: Bool = false
  ) throws {
    self.ca = ca
    executable = try builtExecutable("edgekey-ra")
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-ra-\(UUID().uuidString)")
    self.directory = directory
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    func write(_ name: String, _ text: String) throws -> String {
      let url = directory.appendingPathComponent(name)
      try text.write(to: url, atomically: true, encoding: .utf8)
      return url.path
    }
    let server = try (tlsCA ?? ca).issueServer()
    let issuer =
      if let tpmIssuer {
        [
          "--ca-cert", try write("ca.pem", tpmIssuer.chainPEM), "--ca-key-tpm", tpmIssuer.keyFile, "--tcti",
          tpmIssuer.tcti,
        ]
      } else {
        [
          "--ca-cert", try write("ca.pem", ca.certificatePEM), "--ca-key",
          try write("ca.key", TestCA.privateKeyPEM(ca.key)),
        ]
      }
    var arguments =
      [
        "--tls-cert", try write("server.pem", server.certificate), "--tls-key", try write("server.key", server.key),
      ] + issuer + [
        "--lifetime", lifetime, "--backdate", backdate, "--log", directory.appendingPathComponent("issued.jsonl").path,
        "--registry", registryPath ?? directory.appendingPathComponent("registry.db").path,
      ]
    if let password { arguments += ["--password", password, "--allow-shared-password", "--name-pattern", "*"] }
    if let bootstrapCA {
      // A bootstrap certificate not in the registry enrols its own CN as the device's name.
      arguments += [
        "--bootstrap-ca", try write("bootstrap-ca.pem", bootstrapCA.certificatePEM), "--bootstrap-name", "{cn}",
      ]
    }
    if let cacertsPEM { arguments += ["--cacerts", try write("cacerts.pem", cacertsPEM)] }
    for (i, pem) in manufacturerCAs.enumerated() { arguments += ["--ek-ca", try write("ek-ca-\(i).pem", pem)] }
    if requireAttestation { arguments.append("--require-attestation") }
    arguments += extraArguments
    var lastLog = ""
    for _ in 0..<5 {
      let port = try PortFinder.free()
      let log = directory.appendingPathComponent("ra-\(port).log").path
      let p = try ChildProcess(executable, arguments + ["--listen", "127.0.0.1:\(port)"], logPath: log)
      let deadline = Date().addingTimeInterval(10)
      while p.isRunning && Date() < deadline {
        lastLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        if lastLog.contains("listening on") {
          self.port = port
          self.arguments = arguments + ["--listen", "127.0.0.1:\(port)"]
          process = p
          return
        }
        usleep(20_000)
      }
      p.stop()
    }
    throw HarnessError("edgekey-ra did not start: \(lastLog)")
  }

  public var url: String { "https://127.0.0.1:\(port)" }
  /// The device registry's file (`--registry`).
  public var registryPath: String { arguments[arguments.firstIndex(of: "--registry")! + 1] }

  /// Runs `edgekey-ra admin --registry <ours> ARGS` and returns its exit status and output
  /// (standard output, then standard error).
  @discardableResult
  public func admin(_ arguments: [String]) throws -> (status: Int32, output: String) {
    let log = directory.appendingPathComponent("admin-\(UUID().uuidString).log").path
    let p = try ChildProcess(executable, ["admin", "--registry", registryPath] + arguments, logPath: log)
    let status = p.wait()
    return (status, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
  }

  /// Imports a factory manifest (JSON lines) through `edgekey-ra admin import`.
  public func importManifest(_ lines: [String]) throws {
    try importManifest(text: lines.joined(separator: "\n") + "\n")
  }

  /// Imports a manifest (JSON lines or CSV) given as text.
  public func importManifest(text: String) throws {
    let file = directory.appendingPathComponent("manifest-\(UUID().uuidString).jsonl")
    try text.write(to: file, atomically: true, encoding: .utf8)
    let (status, output) = try admin(["import", file.path])
    guard status == 0 else { throw HarnessError("admin import failed: \(output)") }
  }
  public var isRunning: Bool { process?.isRunning ?? false }
  public var localhostURL: String { "https://localhost:\(port)" }

  /// What the RA wrote to its standard output and error, all runs.
  public var log: String {
    let files = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
    return files.filter { $0.hasPrefix("ra-") && $0.hasSuffix(".log") }.sorted().compactMap {
      try? String(contentsOf: directory.appendingPathComponent($0), encoding: .utf8)
    }.joined()
  }

  /// The issuance log, one JSON object per line.
  public var issuanceLog: [String] {
    ((try? String(contentsOf: directory.appendingPathComponent("issued.jsonl"), encoding: .utf8)) ?? "")
      .split(separator: "\n").map(String.init)
  }

  public func stop() {
    process?.stop()
    process = nil
  }

  /// SIGKILL, as a crash or power cut would (`restart` starts it again).
  public func kill() {
    process?.kill9()
    process = nil
  }

  /// Starts it again on the same port (after `stop`).
  public func restart() throws {
    stop()
    let p = try ChildProcess(executable, arguments, logPath: directory.appendingPathComponent("ra-restart.log").path)
    guard PortFinder.waitUntilListening(port, timeout: 10) else { throw HarnessError("edgekey-ra did not restart") }
    process = p
  }

  deinit { stop() }
}

private func jsonString(_ s: String) -> String {
  let data = try! JSONSerialization.data(withJSONObject: [s], options: [.withoutEscapingSlashes])
  return String(decoding: data.dropFirst().dropLast(), as: UTF8.self)
}
