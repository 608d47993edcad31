// QoS 1 messages per second through mutual TLS to mosquitto: EdgeKey's MQTTClient (in-memory
// outbox, SQLite outbox without and with an fsync per message) against a plain libmosquitto C
// publisher on the same SSL_CTX, broker and payload; and the resident memory of a publishing
// process (`edgekey pub`) against `mosquitto_pub`'s.
import CEdgeKeyBenchAnchor
import COpenSSL
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

struct Throughput {
  var name: String
  var perSecond: Double
  var messages: Int
}

/// Runs an async body from synchronous code.
func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
  let done = DispatchSemaphore(value: 0)
  nonisolated(unsafe) var result: Result<T, any Error>?
  Task {
    do { result = .success(try await body()) } catch { result = .failure(error) }
    done.signal()
  }
  done.wait()
  return try result!.get()
}

/// Publishes `count` messages one `enqueue` at a time (or in batches), from `publishers` tasks
/// at once, and waits for the last acknowledgement; messages per second.
func ourRate(
  _ tls: TLSClientContext, port: UInt16, outbox: Outbox, count: Int, payload: [UInt8], batch: Int = 1,
  publishers: Int = 1
) throws -> Double {
  try blocking {
    let client = try MQTTClient(MQTTConfiguration(host: "127.0.0.1", port: port), tls: tls, outbox: outbox)
    try await client.connect()
    let message = MQTTMessage(topic: "bench/edgekey", payload: payload, qos: .atLeastOnce)
    let start = Date()
    try await withThrowingTaskGroup(of: Void.self) { group in
      for p in 0..<publishers {
        // Publisher p sends its share; each enqueue returns once its messages are durable.
        let share = count / publishers + (p < count % publishers ? 1 : 0)
        group.addTask {
          var sent = 0
          while sent < share {
            let n = min(batch, share - sent)
            try await client.enqueue(Array(repeating: message, count: n))
            sent += n
          }
        }
      }
      try await group.waitForAll()
    }
    try await client.waitUntilDelivered(timeout: .seconds(600))
    let rate = Double(count) / Date().timeIntervalSince(start)
    await client.stop()
    return rate
  }
}

func mqttThroughput(
  _ tls: TLSClientContext, broker: MosquittoBroker, work: URL, messages: Int, payloadSize: Int
) throws -> [Throughput] {
  let payload = [UInt8](repeating: UInt8(ascii: "x"), count: payloadSize)
  var rows: [Throughput] = []
  let anchor = edgekey_anchor_publish(
    "127.0.0.1", Int32(broker.port), tls.sslContext, Int32(messages), Int32(payloadSize), 5)
  guard anchor > 0 else { throw HarnessError("the libmosquitto anchor failed (\(anchor))") }
  rows.append(Throughput(name: "libmosquitto C loop (anchor)", perSecond: anchor, messages: messages))
  /// One row: `count` messages through `outbox` from `publishers` tasks, `batch` at a time.
  func row(_ name: String, _ outbox: Outbox, count: Int = messages, publishers: Int = 1, batch: Int = 1) throws {
    let rate = try ourRate(
      tls, port: broker.port, outbox: outbox, count: count, payload: payload, batch: batch, publishers: publishers)
    rows.append(Throughput(name: name, perSecond: rate, messages: count))
  }
  func file(_ name: String, _ durability: OutboxDurability) throws -> Outbox {
    try Outbox(path: work.appendingPathComponent(name).path, durability: durability)
  }
  try row("EdgeKey, in-memory outbox", .memory())
  try row("EdgeKey, SQLite outbox, processSafe", try file("process-safe.db", .processSafe))
  // An fsync per accepted message is bounded by the disk, not the client: fewer messages.
  try row(
    "EdgeKey, SQLite outbox, powerSafe", try file("power-safe.db", .powerSafe), count: max(min(messages / 10, 2000), 1))
  // Most callers publish one message at a time from several tasks: group commit stores what
  // arrives during a commit with the next one (one fsync for all of them).
  try row("EdgeKey, in-memory outbox, 16 publishers", .memory(), publishers: 16)
  try row("EdgeKey, processSafe, 16 publishers", try file("process-safe-16.db", .processSafe), publishers: 16)
  try row("EdgeKey, powerSafe, 16 publishers", try file("power-safe-16.db", .powerSafe), publishers: 16)
  try row("EdgeKey, powerSafe, enqueue ×100", try file("power-safe-batched.db", .powerSafe), batch: 100)
  return rows
}

/// Runs a program to completion (or, with `stopAfter`, until then, when it gets SIGTERM); its
/// exit status and peak resident memory (KiB).
func peakMemory(
  _ path: String, _ arguments: [String], environment: [String: String], stopAfter: Duration? = nil
) throws -> (Int32, Int) {
  var pid: pid_t = 0
  let argv = ([path] + arguments).map { strdup($0) } + [nil]
  let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
  defer {
    argv.forEach { free($0) }
    envp.forEach { free($0) }
  }
  var actions = posix_spawn_file_actions_t()
  posix_spawn_file_actions_init(&actions)
  defer { posix_spawn_file_actions_destroy(&actions) }
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
  let rc = posix_spawn(&pid, path, &actions, nil, argv, envp)
  guard rc == 0 else { throw HarnessError("cannot run \(path): \(String(cString: strerror(rc)))") }
  // Not wait4's ru_maxrss: posix_spawn shares our memory until exec, and Linux carries that
  // high-water mark into the child's. The child's own mm reports its peak as VmHWM.
  var status: Int32 = 0
  var peak = 0
  let clock = ContinuousClock()
  let deadline = stopAfter.map { clock.now.advanced(by: $0) }
  var signalled = false
  while true {
    if let deadline, !signalled, clock.now >= deadline {
      kill(pid, SIGTERM)
      signalled = true
    }
    if let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
      let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
      let kib = Int(line.split(separator: " ").dropFirst().first ?? "")
    {
      peak = max(peak, kib)
    }
    let done = waitpid(pid, &status, WNOHANG)
    if done == pid || (done < 0 && errno != EINTR) { break }
    usleep(2000)
  }
  return ((status >> 8) & 0xff, peak)
}

/// Time and TPM commands per MQTT reconnect (a new connection with the same identity, the
/// client's own disconnect and reconnect), with swtpm's speed and with every TPM command 100 ms
/// slower (a real chip; `delay:` TCTI): a full TLS handshake (one TPM2_Sign) when `resumes` is
/// off, a resumed session (no TPM command) when it is on.
func reconnectCost(ca: TestCA, broker: MosquittoBroker, tctiPrefix: String, resumes: Bool, count: Int) throws -> (
  milliseconds: Double, commands: Double
) {
  let device = try TPMDevice(
    ca: ca, commonName: "bench-reconnect", tctiPrefix: tctiPrefix, resumesSessions: resumes)
  let (tpm, context) = (device.tpm, device.context)
  return try blocking {
    let client = try MQTTClient(MQTTConfiguration(host: "127.0.0.1", port: broker.port), tls: context)
    try await client.connect()
    let before = tpm.commandCount
    let clock = ContinuousClock()
    let start = clock.now
    for i in 1...count {
      client.replaceCredentials(context, reconnect: true)
      while client.metrics.connections < 1 + i { try await Task.sleep(for: .milliseconds(1)) }
    }
    let took = clock.now - start
    let commands = Double(tpm.commandCount - before) / Double(count)
    if resumes && client.metrics.resumedConnections != count {
      throw HarnessError("\(client.metrics.resumedConnections) of \(count) reconnects resumed")
    }
    await client.stop()
    return (took.seconds * 1000 / Double(count), commands)
  }
}

func runReconnects(ca: TestCA, broker: MosquittoBroker) throws {
  let fullFast = try reconnectCost(ca: ca, broker: broker, tctiPrefix: "", resumes: false, count: 50)
  let resumedFast = try reconnectCost(ca: ca, broker: broker, tctiPrefix: "", resumes: true, count: 50)
  let fullSlow = try reconnectCost(ca: ca, broker: broker, tctiPrefix: "delay:100:", resumes: false, count: 10)
  let resumedSlow = try reconnectCost(ca: ca, broker: broker, tctiPrefix: "delay:100:", resumes: true, count: 10)
  print("")
  print("MQTT reconnect                                   ms per reconnect   TPM commands per reconnect")
  for (name, r) in [
    ("full handshake, swtpm (about 1 ms a command)", fullFast), ("resumed session, swtpm", resumedFast),
    ("full handshake, 100 ms a TPM command (delay:)", fullSlow), ("resumed session, 100 ms a TPM command", resumedSlow),
  ] {
    print(name.padding(toLength: 48, withPad: " ", startingAt: 0) + String(format: "%10.1f         %6.2f", r.0, r.1))
  }
  Report.shared.add(
    "ms per MQTT reconnect, TPM at 100 ms a command: full handshake", ours: fullSlow.milliseconds,
    anchorName: "swtpm speed", anchor: fullFast.milliseconds, unit: " ms", higherIsBetter: false)
  Report.shared.add(
    "ms per MQTT reconnect, TPM at 100 ms a command: resumed session", ours: resumedSlow.milliseconds,
    anchorName: "full handshake", anchor: fullSlow.milliseconds, unit: " ms", higherIsBetter: false)
  Report.shared.add(
    "ms per MQTT reconnect at swtpm speed: resumed session", ours: resumedFast.milliseconds,
    anchorName: "full handshake", anchor: fullFast.milliseconds, unit: " ms", higherIsBetter: false)
  Report.shared.add(
    "TPM commands per MQTT reconnect: resumed session", ours: resumedSlow.commands, anchorName: "full handshake",
    anchor: fullSlow.commands, unit: "", higherIsBetter: false)
}
