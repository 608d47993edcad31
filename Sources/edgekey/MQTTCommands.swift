import Dispatch
import EdgeKeyCore
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

func flushStandardOutput() { fflush(nil) }

/// Runs an async command body from the synchronous CLI.
func runAsync(_ body: @escaping @Sendable () async throws -> Void) {
  let done = DispatchSemaphore(value: 0)
  nonisolated(unsafe) var failure: (any Error)?
  Task {
    do { try await body() } catch { failure = error }
    done.signal()
  }
  done.wait()
  if let failure {
    if let e = failure as? TLSError { fail(e.description, .failure) }
    fail("\(failure)", .failure)
  }
}

/// The MQTT client of `pub` and `sub`: the TPM key, our certificate, the broker's CA.
func mqttClient(_ args: Arguments, logger: Logger) -> (MQTTClient, TPM, TPMKey) {
  guard let host = args.option("host"), let port = UInt16(args.option("port") ?? "8883") else {
    fail("needs -h/--host H (and -p/--port P, default 8883)", .usage)
  }
  guard let caFile = args.option("cafile"), let certFile = args.option("cert") else {
    fail("needs --cafile CA.pem and --cert CERT.pem", .usage)
  }
  do {
    let tpm = try TPM.open(tcti: args.option("tcti"), logger: logger)
    let key = try loadKeyOption(args, tpm: tpm)
    let context = try TLSClientContext(
      certificateChain: try Certificate.chain(pem: readText(certFile)), key: key,
      policy: brokerPolicy(args, host: host, caFile: caFile))
    var configuration = MQTTConfiguration(host: host, port: port, clientID: args.option("id"))
    applyMQTTOptions(args, to: &configuration)
    let outbox = try args.option("outbox").map { try Outbox(path: $0) }
    return (try MQTTClient(configuration, tls: context, outbox: outbox, logger: logger), tpm, key)
  } catch let error as TPMError {
    fail(error.description, error.code == .unreachable ? .tpmUnreachable : .failure)
  } catch {
    fail("\(error)", .failure)
  }
}

func qosOption(_ args: Arguments) -> MQTTQoS {
  guard let qos = MQTTQoS(rawValue: Int32(args.option("qos") ?? "1") ?? -1) else { fail("-q/--qos 0, 1 or 2", .usage) }
  return qos
}

/// `edgekey pub`: like mosquitto_pub, with the TPM key; QoS ≥ 1 messages go through the outbox
/// (durable with --outbox), and the command returns when the broker has acknowledged them all.
/// Payloads are bytes and pass unchanged (-m, -f FILE, -s whole stdin, -l a message per line);
/// the topic must be UTF-8 and a valid name, checked before connecting.
func pubCommand(_ args: Arguments, logger: Logger) {
  guard let topic = args.option("topic") else { fail("pub needs -t/--topic", .usage) }
  do { try MQTTTopic.checkName(topic) } catch { fail("-t/--topic: \(error.reason)", .usage) }
  let qos = qosOption(args)
  var payloads: [[UInt8]] = []
  if let message = args.optionBytes("message") { payloads.append(message) }
  if let path = args.option("file-message") {
    do { payloads.append(try AtomicFile.read(path, limit: 256 << 20)) } catch {
      fail("-f/--file-message \(path): \(error)", .usage)
    }
  }
  if args.flag("stdin-file") { payloads.append(readStandardInput(limit: 256 << 20)) }
  if let count = args.option("count").flatMap(Int.init) {
    let prefix = args.option("prefix") ?? "message "
    payloads += (0..<count).map { Array("\(prefix)\($0)".utf8) }
  }
  let fromStdin = args.flag("stdin-line")
  if payloads.isEmpty && !fromStdin && args.option("outbox") == nil {
    fail(
      "pub needs -m/--message, -f/--file-message, -s/--stdin-file, --count N, -l/--stdin-line, or an --outbox to drain",
      .usage)
  }
  if fromStdin && args.flag("stdin-file") { fail("-l and -s both read standard input: choose one", .usage) }
  let interval = Double(args.option("interval-ms") ?? "0").map { $0 / 1000 } ?? 0
  let timeout = Duration.milliseconds(Int64((Double(args.option("timeout") ?? "60") ?? 60) * 1000))
  let printAccepted = args.flag("print-accepted")
  // Several publishing tasks at once share the outbox's commits (group commit).
  guard let publishers = Int(args.option("publishers") ?? "1"), publishers >= 1, publishers <= 256 else {
    fail("--publishers takes 1 to 256", .usage)
  }
  let retain = args.flag("retain")
  let (client, tpm, key) = mqttClient(args, logger: logger)
  let messages = payloads
  runAsync {
    client.start()
    func accept(_ payload: [UInt8]) async throws {
      if qos == .atMostOnce {
        try await client.connect(timeout: timeout)
        try await client.publish(topic: topic, payload: payload, qos: qos, retain: retain)
      } else {
        try await client.enqueue([MQTTMessage(topic: topic, payload: payload, qos: qos, retain: retain)])
      }
      // Printed only once the message is ours to deliver (stored in the outbox).
      if printAccepted {
        writeStandardOutput(Array("accepted ".utf8) + payload + [0x0A])
      }
      if interval > 0 { try await Task.sleep(nanoseconds: UInt64(interval * 1e9)) }
    }
    if publishers == 1 {
      for payload in messages { try await accept(payload) }
    } else {
      // Payload i goes to publisher i mod N: each publisher keeps its own order.
      try await withThrowingTaskGroup(of: Void.self) { group in
        for p in 0..<publishers {
          group.addTask {
            for i in stride(from: p, to: messages.count, by: publishers) { try await accept(messages[i]) }
          }
        }
        try await group.waitForAll()
      }
    }
    if fromStdin {
      let lines = LineReader()
      while let line = lines.next() { try await accept(line) }
    }
    try await client.waitUntilDelivered(timeout: timeout)
    let m = client.metrics
    logger.info("sent \(m.messagesSent), acknowledged \(m.messagesAcknowledged), resent \(m.messagesResent)")
    await client.stop()
  }
  _ = (tpm, key)
}

/// `edgekey sub`: prints `topic payload` per message, like mosquitto_sub -v; the payload's bytes
/// unchanged. The filter is checked before connecting (`a/#/b` is a usage error).
func subCommand(_ args: Arguments, logger: Logger) {
  guard let topic = args.option("topic") else { fail("sub needs -t/--topic", .usage) }
  do { try MQTTTopic.checkFilter(topic) } catch { fail("-t/--topic: \(error.reason)", .usage) }
  let qos = qosOption(args)
  let count = args.option("count").flatMap(Int.init)
  let (client, tpm, key) = mqttClient(args, logger: logger)
  runAsync {
    try await client.connect(
      timeout: .milliseconds(Int64((Double(args.option("timeout") ?? "30") ?? 30) * 1000)))
    try await client.subscribe(topic, qos: qos)
    var seen = 0
    for await message in client.messages {
      writeStandardOutput(Array(message.topic.utf8) + [0x20] + message.payload + [0x0A])
      seen += 1
      if let count, seen >= count { break }
    }
    await client.stop()
  }
  _ = (tpm, key)
}
