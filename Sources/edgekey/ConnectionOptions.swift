import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// The options every command that connects shares: revocation and ALPN for the server's TLS,
/// MQTT version, session, last will. One place, so that no command takes an option and ignores it.

/// `--crl FILE`: CRLs (PEM, several in one file) for the server's chain, checked at every level;
/// `--crl-url URL`: the CA's CRL fetched over HTTPS (kept in the state directory as crl.pem,
/// fetched again at half its validity), verified against `trustPEM`; `--allow-missing-crl` lets
/// a level whose issuer has no CRL pass.
func crlOptions(_ args: Arguments, trustPEM: String) -> (pem: String?, missing: TLSPolicy.MissingCRL) {
  var pem = args.option("crl").map(readText)
  if let cache = revocationListCache(args, trustPEM: trustPEM) {
    do { pem = (pem ?? "") + (try cache.current()).pem } catch {
      fail("--crl-url: \(error)", error.kind == .configuration ? .usage : .failure)
    }
  }
  return (pem, args.flag("allow-missing-crl") ? .allow : .fail)
}

/// The `--crl-url` cache, or nil without the option.
func revocationListCache(_ args: Arguments, trustPEM: String) -> RevocationListCache? {
  guard let url = args.option("crl-url") else { return nil }
  do {
    return try RevocationListCache(
      url: url, trustAnchors: try Certificate.chain(pem: trustPEM),
      cachePath: args.option("state").map { $0 + "/crl.pem" })
  } catch let error as EnrollmentError {
    fail("--crl-url: \(error)", .usage)
  } catch {
    fail("--crl-url: the CA file: \(error)", .usage)
  }
}

/// `--alpn a,b`: application protocols to offer (AWS IoT Core on 443: x-amzn-mqtt-ca).
func alpnOption(_ args: Arguments) -> [String] {
  guard let text = args.option("alpn") else { return [] }
  let list = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
  guard list.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 255 }) else {
    fail("--alpn takes protocol names separated by commas, each 1 to 255 bytes", .usage)
  }
  return list
}

/// The broker's side of mutual TLS: its CA, the name it must have, CRLs, ALPN.
func brokerPolicy(_ args: Arguments, host: String, caFile: String) -> TLSPolicy {
  let trust = readText(caFile)
  let crl = crlOptions(args, trustPEM: trust)
  return TLSPolicy(
    trustAnchorsPEM: trust, serverName: args.option("server-name") ?? host, crlPEM: crl.pem,
    missingCRL: crl.missing, alpn: alpnOption(args))
}

/// `-V/--protocol-version 5|311|auto` (default auto: MQTT 5, 3.1.1 for a broker that does not
/// speak 5), `--disable-clean-session`, `-x/--session-expiry-interval S`, `--will-topic T [--will-payload P] [--will-qos Q]
/// [--will-retain]`.
func applyMQTTOptions(_ args: Arguments, to configuration: inout MQTTConfiguration) {
  switch args.option("protocol-version") {
  case nil, "auto": configuration.protocolVersion = .automatic
  case "5", "mqttv5": configuration.protocolVersion = .v5
  case "311", "3.1.1", "mqttv311": configuration.protocolVersion = .v311
  case let other?: fail("--protocol-version \(other): 5, 311 or auto", .usage)
  }
  if args.flag("disable-clean-session") { configuration.cleanSession = false }
  if let text = args.option("session-expiry-interval") {
    guard let seconds = UInt32(text) else {
      fail("--session-expiry-interval \(text): whole seconds, 0 to \(UInt32.max)", .usage)
    }
    configuration.sessionExpiry = .seconds(Int64(seconds))
  }
  if let topic = args.option("will-topic") {
    do { try MQTTTopic.checkName(topic) } catch { fail("--will-topic: \(error.reason)", .usage) }
    let qos = MQTTQoS(rawValue: Int32(args.option("will-qos") ?? "1") ?? -1)
    guard let qos else { fail("--will-qos 0, 1 or 2", .usage) }
    configuration.will = MQTTWill(
      topic: topic, payload: args.optionBytes("will-payload") ?? [], qos: qos, retain: args.flag("will-retain"))
  } else if args.option("will-payload") != nil || args.option("will-qos") != nil || args.flag("will-retain") {
    fail("--will-payload, --will-qos and --will-retain need --will-topic", .usage)
  }
}

/// Standard input, whole, as bytes.
func readStandardInput(limit: Int) -> [UInt8] {
  var bytes: [UInt8] = []
  var buffer = [UInt8](repeating: 0, count: 65536)
  while true {
    let n = read(0, &buffer, buffer.count)
    if n < 0 && errno == EINTR { continue }
    if n <= 0 { break }
    bytes += buffer[0..<n]
    if bytes.count > limit { fail("standard input is larger than \(limit) bytes", .usage) }
  }
  return bytes
}

/// Standard input one line at a time, as bytes (the newline removed, nothing else changed).
final class LineReader: @unchecked Sendable {
  // @unchecked: used by one thread.
  private var pending: [UInt8] = []
  private var atEnd = false

  func next() -> [UInt8]? {
    while true {
      if let newline = pending.firstIndex(of: 0x0A) {
        let line = Array(pending[..<newline])
        pending.removeFirst(newline + 1)
        return line
      }
      if atEnd {
        if pending.isEmpty { return nil }
        defer { pending = [] }
        return pending
      }
      var buffer = [UInt8](repeating: 0, count: 65536)
      let n = read(0, &buffer, buffer.count)
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { atEnd = true } else { pending += buffer[0..<n] }
    }
  }
}

/// Bytes to standard output, unchanged.
func writeStandardOutput(_ bytes: [UInt8]) {
  var offset = 0
  while offset < bytes.count {
    let n = bytes[offset...].withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    if n < 0 && errno == EINTR { continue }
    if n <= 0 { return }
    offset += n
  }
}
