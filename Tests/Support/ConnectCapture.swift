import Foundation

/// A one-connection MQTT 5 peer over mutual TLS (`Peers/connect_capture.py`, Python's ssl
/// module): it records the CONNECT packet a client sends, as an independent reader of it, and
/// answers with a CONNACK carrying user properties and a topic alias maximum. Stopped on
/// `deinit`.
public final class ConnectCapture: @unchecked Sendable {
  public let port: UInt16
  public let directory: URL
  private let process: ChildProcess
  private let output: URL

  public init(certificatePEM: String, keyPEM: String, clientCAPEM: String) throws {
    let files = try PeerFiles(
      script: "connect_capture.py", prefix: "edgekey-capture", certificatePEM: certificatePEM, keyPEM: keyPEM,
      clientCAPEM: clientCAPEM)
    let (dir, script, cert, key, ca) = (files.directory, files.script, files.certificate, files.key, files.clientCA)
    directory = dir
    output = dir.appendingPathComponent("connect.hex")
    let log = dir.appendingPathComponent("capture.log")
    let port = try PortFinder.free()
    process = try ChildProcess(
      "/usr/bin/python3", [script, String(port), ca, cert, key, output.path], logPath: log.path)
    let deadline = Date().addingTimeInterval(30)
    var text = ""
    while process.isRunning && Date() < deadline {
      text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
      if text.contains("ready") { break }
      usleep(20_000)
    }
    guard text.contains("ready") else {
      process.stop()
      throw HarnessError("connect_capture.py did not start: \(text)")
    }
    self.port = port
  }

  /// The CONNECT packet received, once it has been (nil before).
  public var connect: [UInt8]? {
    guard let hex = try? String(contentsOf: output, encoding: .utf8) else { return nil }
    var bytes: [UInt8] = []
    var index = hex.startIndex
    while index < hex.endIndex, let next = hex.index(index, offsetBy: 2, limitedBy: hex.endIndex) {
      guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
      bytes.append(byte)
      index = next
    }
    return bytes
  }

  deinit {
    process.stop()
    try? FileManager.default.removeItem(at: directory)
  }
}

/// An MQTT 5 CONNECT read field by field (MQTT 5 §3.1), for tests.
public struct ConnectPacket {
  public var level: UInt8 = 0
  public var cleanStart = false
  public var keepAlive: UInt16 = 0
  public var sessionExpiry: UInt32?
  public var receiveMaximum: UInt16?
  public var maximumPacketSize: UInt32?
  public var userProperties: [(String, String)] = []
  public var clientID = ""

  public init?(_ p: [UInt8]) {
    guard p.first == 0x10 else { return nil }
    var at = 1
    func varint() -> Int? {
      var value = 0
      var shift = 0
      while at < p.count {
        let b = p[at]
        at += 1
        value |= Int(b & 0x7F) << shift
        if b & 0x80 == 0 { return value }
        shift += 7
      }
      return nil
    }
    func u16() -> UInt16? {
      guard at + 2 <= p.count else { return nil }
      defer { at += 2 }
      return UInt16(p[at]) << 8 | UInt16(p[at + 1])
    }
    func u32() -> UInt32? {
      guard let hi = u16(), let lo = u16() else { return nil }
      return UInt32(hi) << 16 | UInt32(lo)
    }
    func string() -> String? {
      guard let n = u16(), at + Int(n) <= p.count else { return nil }
      defer { at += Int(n) }
      return String(decoding: p[at..<at + Int(n)], as: UTF8.self)
    }
    guard varint() != nil, string() == "MQTT", at + 2 <= p.count else { return nil }
    level = p[at]
    cleanStart = p[at + 1] & 0x02 != 0
    at += 2
    guard let keepAlive = u16(), let propertiesLength = varint() else { return nil }
    self.keepAlive = keepAlive
    let end = at + propertiesLength
    while at < end {
      let id = p[at]
      at += 1
      switch id {
      case 0x11: sessionExpiry = u32()
      case 0x21: receiveMaximum = u16()
      case 0x27: maximumPacketSize = u32()
      case 0x22: _ = u16()
      case 0x17, 0x19: at += 1
      case 0x26:
        guard let name = string(), let value = string() else { return nil }
        userProperties.append((name, value))
      default: return nil
      }
    }
    guard at == end, let clientID = string() else { return nil }
    self.clientID = clientID
  }
}
