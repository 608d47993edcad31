import COpenSSL
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// The calling thread's name (as EdgeKey's threads set it, in /proc/thread-self/comm).
func currentThreadName() -> String {
  let text = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "?"
  return text.trimmingCharacters(in: .whitespacesAndNewlines)
}

extension Fixture {
  /// A broker with mutual TLS whose certificate comes from the fixture's CA.
  func broker(crl: String? = nil, aclFile: String? = nil, persistent: Bool = false) throws -> MosquittoBroker {
    let serverCert = try ca.issueServer()
    return try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: ca.certificatePEM, crlPEM: crl,
      aclFile: aclFile, persistent: persistent)
  }

  /// A broker whose certificate comes from a CA we do not trust ("Stranger CA").
  func untrustedBroker() throws -> MosquittoBroker {
    let cert = try TestCA(name: "Stranger CA").issueServer()
    return try MosquittoBroker(certificatePEM: cert.certificate, keyPEM: cert.key, clientCAPEM: ca.certificatePEM)
  }

  /// Another party's identity from the same CA, with a software key (a test's subscriber).
  func softwareParty(_ commonName: String, serverName: String = "127.0.0.1") throws -> TLSClientContext {
    let issued = try ca.issueSoftwareClient(commonName: commonName)
    defer { EVP_PKEY_free(issued.key) }  // the context holds its own reference
    return try TLSClientContext(
      certificateChain: try Certificate.chain(pem: issued.certificate), softwareKey: issued.key,
      policy: TLSPolicy(trustAnchorsPEM: ca.certificatePEM, serverName: serverName))
  }

  /// A new identity for the same device: a second key in the same TPM (rotation).
  func otherDevice(_ commonName: String, serverName: String = "127.0.0.1") throws -> (TPMKey, TLSClientContext) {
    let other = try tpm.loadKey(try tpm.createKey(.eccP256))
    let issued = try ca.issueClient(publicKeyDER: other.publicKey.spki, commonName: commonName)
    let context = try TLSClientContext(
      certificateChain: try Certificate.chain(pem: issued.certificate), key: other,
      policy: TLSPolicy(trustAnchorsPEM: ca.certificatePEM, serverName: serverName))
    return (other, context)
  }
}

@Suite("MQTT delivery: outbox, reconnects, refusals (mosquitto with require_certificate)", .serialized)
struct MQTTDeliveryTests {
  @Test("the broker killed and restarted during a QoS 1 stream: every accepted message arrives")
  func brokerRestart() async throws {
    let f = try Fixture(commonName: "device-0200")
    let broker = try f.broker(persistent: true)
    // The sink keeps a persistent session, which the broker saves every second and restores
    // after its restart, so that it is subscribed again before anyone reconnects.
    let sinkTLS = try f.softwareParty("sink-0200")
    var sinkConfiguration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    sinkConfiguration.cleanSession = false
    sinkConfiguration.protocolVersion = .v311  // a session that outlives the connection (see MQTTConfiguration)
    sinkConfiguration.reconnect = quickReconnect
    let sink = try MQTTClient(sinkConfiguration, tls: sinkTLS)
    try await sink.connect()
    try await sink.subscribe("devices/device-0200/#", qos: .atLeastOnce)
    // Wait for the event: the broker saved its database after the subscription (autosave runs
    // every 1-2 s). A fixed sleep lost the race once on a loaded machine: the kill came before
    // the save, the restored session had no subscription, and 200 messages had nowhere to go.
    while true {
      let log = broker.log
      if let subscribed = log.range(of: "Received SUBSCRIBE from sink-0200", options: .backwards),
        log[subscribed.upperBound...].contains("Saving in-memory database")
      {
        break
      }
      try await Task.sleep(for: .milliseconds(50))
    }

    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    let outboxPath = temporaryPath("outbox.db")
    let publisher = try MQTTClient(
      configuration, tls: try f.context(serverName: "127.0.0.1"), outbox: try Outbox(path: outboxPath))
    try await publisher.connect()
    var accepted = Set<String>()
    for batch in 0..<6 {
      if batch == 2 {
        broker.kill9()
        // Accepted while offline: kept in the outbox.
      }
      if batch == 4 { try broker.start() }
      for i in 0..<50 {
        let text = "reading \(batch * 50 + i)"
        try await publisher.enqueue([
          MQTTMessage(topic: "devices/device-0200/telemetry", payload: Array(text.utf8), qos: .atLeastOnce)
        ])
        accepted.insert(text)
      }
      try await Task.sleep(nanoseconds: 100_000_000)
    }
    try await publisher.waitUntilDelivered(timeout: .seconds(30))
    let (got, duplicates) = await drain(sink, expecting: accepted, within: 30)
    let missing = accepted.subtracting(got)
    if !missing.isEmpty { print(broker.log) }
    #expect(missing.isEmpty, "\(missing.count) accepted messages never arrived, e.g. \(missing.sorted().prefix(5))")
    let m = publisher.metrics
    print(
      "broker restart: accepted \(accepted.count), arrived \(got.count), duplicates \(duplicates), "
        + "sent \(m.messagesSent), resent \(m.messagesResent), connections \(m.connections)")
    #expect(m.connections >= 2)
    // A restarted mosquitto has a new ticket key: the ticket we offer is declined and the
    // handshake completes in full, without a failed attempt.
    #expect(m.resumedConnections == 0)
    #expect(m.handshakeFailures.isEmpty, "\(m.handshakeFailures)")
    #expect(m.messagesAcknowledged >= accepted.count)
    #expect(m.messagesDroppedTotal == 0)
    #expect(publisher.outbox.count == 0)
    await publisher.stop()
    await sink.stop()
  }

  @Test(
    "a slow chip (540 ms a TPM command, a mock: swtpm answers in 1 ms): the default timeouts and keep-alive still connect, publish and reconnect, full and resumed"
  )
  func slowChip() async throws {
    let f = try Fixture(commonName: "device-0207", tctiPrefix: "delay:540:")
    let broker = try f.broker()
    let proxy = try FaultProxy(to: broker.port)
    defer { proxy.stop() }
    let client = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: proxy.port), tls: try f.context(serverName: "127.0.0.1"))
    let clock = ContinuousClock()
    let start = clock.now
    try await client.connect()
    let connected = clock.now - start
    try await client.publish(topic: "devices/device-0207/t", payload: Array("slow".utf8))
    // A restarted broker declines our ticket (a new ticket key): the reconnect signs again.
    broker.kill9()
    try broker.start()
    var lost = clock.now
    while client.metrics.connections < 2 { try await Task.sleep(for: .milliseconds(50)) }
    let full = clock.now - lost
    try await client.publish(topic: "devices/device-0207/t", payload: Array("again".utf8))
    // The connection reset, the broker still up: the reconnect resumes, the chip is not asked.
    let commands = f.tpm.commandCount
    lost = clock.now
    proxy.resetAll()
    while client.metrics.connections < 3 { try await Task.sleep(for: .milliseconds(50)) }
    let resumed = clock.now - lost
    try await client.publish(topic: "devices/device-0207/t", payload: Array("resumed".utf8))
    print(
      "slow chip (540 ms a command): first connection \(connected), reconnected in full \(full) after the broker "
        + "came back, resumed \(resumed) after a reset"
    )
    #expect(client.metrics.resumedConnections == 1)
    #expect(f.tpm.commandCount == commands, "a resumed reconnect sends nothing to the TPM")
    // The broker being down may fail attempts at the network; none timed out or lost the TPM.
    let failures = client.metrics.handshakeFailures
    #expect(failures["timedOut"] == nil && failures["tpmSigningFailed"] == nil, "\(failures)")
    await client.stop()
  }

  @Test("a consumer that does not read: the messages stream keeps the newest receiveBuffer, the rest are counted")
  func boundedReceiveBuffer() async throws {
    let f = try Fixture(commonName: "device-0206")
    let broker = try f.broker()
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.receiveBuffer = 5
    let sink = try MQTTClient(configuration, tls: try f.softwareParty("sink-0206"))
    try await sink.connect()
    try await sink.subscribe("devices/device-0206/#")
    let publisher = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: broker.port), tls: try f.context(serverName: "127.0.0.1"))
    try await publisher.connect()
    try await publisher.enqueue(
      (0..<20).map { MQTTMessage(topic: "devices/device-0206/t", payload: Array("m\($0)".utf8), qos: .atLeastOnce) })
    try await publisher.waitUntilDelivered()
    // Wait for the event: all 20 reached the sink's network thread, nobody read the stream.
    while sink.metrics.messagesReceived < 20 { try await ContinuousClock().sleep(for: .milliseconds(20)) }
    #expect(sink.metrics.messagesReceivedDropped == 15)
    #expect(sink.openMetrics().contains("edgekey_mqtt_messages_received_dropped_total 15"))
    // The stream holds what was kept: had nothing been dropped, m0 would come first.
    var kept: [String] = []
    var iterator = sink.messages.makeAsyncIterator()
    while kept.count < 5, let message = await iterator.next() {
      kept.append(String(decoding: message.payload, as: UTF8.self))
    }
    #expect(kept == (15..<20).map { "m\($0)" }, "the newest five, in order")
    await sink.stop()
    await publisher.stop()
    var zero = configuration
    zero.receiveBuffer = 0
    #expect(throws: MQTTError.self) { try MQTTClient(zero, tls: try f.softwareParty("sink-0206")) }
  }

  @Test("the outbox survives the client: messages stored by one client are delivered by the next")
  func outboxAcrossRestarts() async throws {
    let f = try Fixture(commonName: "device-0201")
    let broker = try f.broker()
    let sinkTLS = try f.softwareParty("sink-0201")
    let sink = try MQTTClient(MQTTConfiguration(host: "127.0.0.1", port: broker.port), tls: sinkTLS)
    try await sink.connect()
    try await sink.subscribe("devices/device-0201/#")
    let outboxPath = temporaryPath("outbox.db")
    // A client that never connects (nothing listens on its port) accepts messages offline.
    do {
      let offline = try MQTTClient(
        MQTTConfiguration(host: "127.0.0.1", port: try PortFinder.free()), tls: try f.context(serverName: "127.0.0.1"),
        outbox: try Outbox(path: outboxPath))
      try await offline.enqueue(
        (0..<20).map { MQTTMessage(topic: "devices/device-0201/t", payload: Array("m\($0)".utf8), qos: .exactlyOnce) })
      #expect(offline.outbox.count == 20)
      await #expect(throws: MQTTError.self) {
        try await offline.publish(topic: "devices/device-0201/t", payload: [1], qos: .atMostOnce)
      }
    }
    let reopened = try Outbox(path: outboxPath)
    #expect(reopened.count == 20)
    let client = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: broker.port), tls: try f.context(serverName: "127.0.0.1"),
      outbox: reopened)
    try await client.connect()
    try await client.waitUntilDelivered()
    let expected = Set((0..<20).map { "m\($0)" })
    let (got, _) = await drain(sink, expecting: expected, within: 10)
    #expect(got == expected)
    await client.stop()
    await sink.stop()
  }

  @Test(
    "16 tasks enqueue into a powerSafe outbox while a commit holds the disk: none blocks a cooperative thread, the commits run on EdgeKey's, the next takes all that arrived meanwhile"
  )
  func enqueueSuspends() async throws {
    let f = try Fixture(commonName: "device-0290")
    let outbox = try Outbox(path: temporaryPath("suspend.db"), durability: .powerSafe)
    let client = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: try PortFinder.free()), tls: try f.context(serverName: "127.0.0.1"),
      outbox: outbox)
    // The first commit is held (a slow fsync) until every other append is pending: with a
    // commit on each caller's thread, a cooperative pool of a few threads would be stuck here.
    // (On a loaded machine all sixteen may be pending before the first commit starts.)
    let first = Flag()
    let threads = Locked<Set<String>>([])
    let groups = Locked<[Int]>([])
    outbox.onCommit { [weak outbox] n in
      threads.withLock { $0.insert(currentThreadName()) }
      groups.withLock { $0.append(n) }
      guard first.raiseOnce(), let outbox else { return }
      let deadline = ContinuousClock.now + .seconds(30)
      while outbox.pendingCount < 16 - n && ContinuousClock.now < deadline { usleep(1000) }
    }
    try await withThrowingTaskGroup(of: Void.self) { group in
      for i in 0..<16 {
        group.addTask {
          try await client.enqueue([
            MQTTMessage(topic: "devices/device-0290/t", payload: Array("m\(i)".utf8), qos: .atLeastOnce)
          ])
        }
      }
      try await group.waitForAll()
    }
    outbox.onCommit(nil)
    let sizes = groups.withLock { $0 }
    #expect(sizes.count <= 2, "the first commit, then one for all that arrived during it: \(sizes)")
    #expect(sizes.reduce(0, +) == 16)
    #expect(outbox.count == 16, "every enqueue returned after its message was stored")
    #expect(threads.withLock { $0 } == ["edgekey-work"], "commits ran on EdgeKey's threads: \(threads.withLock { $0 })")
    await client.stop()
  }

  @Test(
    "a broker we must not trust: a typed error, then a long back-off instead of a retry storm",
    arguments: ["untrusted CA", "wrong host name"])
  func refusedServer(_ fault: String) async throws {
    let f = try Fixture()
    let broker: MosquittoBroker
    var serverName = "127.0.0.1"
    if fault == "untrusted CA" {
      broker = try f.untrustedBroker()
    } else {
      broker = try f.broker()
      serverName = "broker.example.net"
    }
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: serverName))
    let error = await #expect(throws: TLSError.self) { try await client.connect() }
    #expect(error?.layer == .serverCertificate)
    if fault == "untrusted CA" {
      #expect(error?.code == .issuerNotFound || error?.code == .untrustedRoot)
    } else {
      #expect(error?.code == .nameMismatch)
      #expect(error?.reason.contains("(expected broker.example.net)") == true, "\(String(describing: error))")
    }
    try await Task.sleep(nanoseconds: 1_000_000_000)
    // The quick policy would have retried ~10 times in a second; a refusal waits minutes.
    #expect(client.metrics.connectAttempts == 1)
    if case .waiting(let retryIn, _) = client.state {
      #expect(retryIn >= .seconds(150))
    } else {
      Issue.record("expected to be waiting, is \(client.state)")
    }
    #expect(client.metrics.handshakeFailures.values.reduce(0, +) == 1)
    #expect(client.openMetrics().contains("edgekey_mqtt_handshake_failures_total{reason="))
    await client.stop()
  }

  @Test("a broker we do not trust, 60 times with every core busy: always the server-certificate error, never a timeout")
  func untrustedBrokerUnderLoad() async throws {
    let f = try Fixture()
    let broker = try f.untrustedBroker()
    let load = CPULoad(threads: ProcessInfo.processInfo.activeProcessorCount)
    defer { load.stop() }
    var outcomes: [String: Int] = [:]
    for _ in 0..<60 {
      var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
      configuration.reconnect = quickReconnect
      let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
      do {
        try await client.connect(timeout: .seconds(30))
        outcomes["connected", default: 0] += 1
      } catch let error as TLSError {
        outcomes["\(error.layer.rawValue) \(error.codeName)", default: 0] += 1
      } catch {
        outcomes["\(error)", default: 0] += 1
      }
      await client.stop()
    }
    print("untrusted broker under load: \(outcomes)")
    #expect(outcomes.keys.allSatisfy { $0.hasPrefix("server certificate") }, "\(outcomes)")
  }

  @Test("connect() after the first attempt already failed throws that failure, not a timeout minutes later")
  func connectAfterFailure() async throws {
    // The other half of the flake: connect() started the client and only then registered its
    // waiter, so an attempt that failed in between (a refusal, on an idle core) was missed and
    // the waiter sat out the timeout while the client waited minutes to retry.
    let f = try Fixture()
    let broker = try f.untrustedBroker()
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    defer { client.stop() }
    client.start()
    for await state in client.stateChanges {
      if case .waiting = state { break }
    }
    let error = await #expect(throws: TLSError.self) { try await client.connect(timeout: .seconds(60)) }
    #expect(error?.layer == .serverCertificate)
  }

  @Test("a TCP connect that completes late (the SYN retransmitted): the handshake still runs, the error is typed")
  func lateTCPConnect() async throws {
    // The root cause of the untrusted-CA flake: when the loopback connect was not complete inside
    // mosquitto_connect_bind_async, the TLS handshake waited for a readable socket that the
    // server, waiting for our ClientHello, never made readable; the attempt ended at the connect
    // timeout instead of the certificate error.
    let f = try Fixture()
    let broker = try f.untrustedBroker()
    let proxy = try LateAcceptProxy(to: broker.port)
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: proxy.port)
    configuration.reconnect = quickReconnect
    configuration.connectTimeout = .seconds(20)
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    defer { client.stop() }
    proxy.releaseWhenConnectPending()
    let error = await #expect(throws: TLSError.self) { try await client.connect(timeout: .seconds(30)) }
    #expect(error?.layer == .serverCertificate, "\(String(describing: error))")
  }

  @Test("a revoked client certificate: the broker's refusal is a typed error and no retry storm")
  func revokedClient() async throws {
    let f = try Fixture(commonName: "device-0202")
    let broker = try f.broker(crl: try f.ca.crl(revoking: [f.clientSerial]))
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    let error = await #expect(throws: TLSError.self) { try await client.connect() }
    // mosquitto's certificate_revoked alert, when it reaches us before the reset that our
    // CONNECT provokes; else the end right after our certificate, which alone proves nothing.
    #expect(
      error?.layer == .rejectedByServer || error?.code == .closedAfterOurCertificate, "\(String(describing: error))")
    #expect(error?.certificate?.subject.contains("device-0202") == true)
    // Either way no retry storm: a refusal waits at once, the ambiguous end after three in a row.
    for await state in client.stateChanges {
      if case .waiting(let retryIn, _) = state, retryIn >= configuration.reconnect.refusedInitialDelay / 2 { break }
    }
    #expect(client.metrics.connectAttempts <= 3)
    await client.stop()
  }

  @Test("a refused connection to the first endpoint moves on to the next")
  func endpointRotation() async throws {
    let f = try Fixture(commonName: "device-0203")
    let broker = try f.broker()
    var configuration = MQTTConfiguration(endpoints: [
      MQTTEndpoint(host: "127.0.0.1", port: try PortFinder.free()), MQTTEndpoint(host: "127.0.0.1", port: broker.port),
    ])
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    client.start()
    for await state in client.stateChanges {
      if case .connected(let endpoint) = state {
        #expect(endpoint.port == broker.port)
        break
      }
    }
    #expect(client.metrics.connectFailures["network"] == 1)
    await client.stop()
    #expect(client.state == .stopped)
  }

  @Test(
    "reconnects resume the TLS session (0 TPM commands); after a credential swap one full handshake with the new key")
  func resumedReconnects() async throws {
    let f = try Fixture(commonName: "device-0206")
    let broker = try f.broker()
    let proxy = try FaultProxy(to: broker.port)
    defer { proxy.stop() }
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: proxy.port)
    configuration.clientID = "device-0206"
    configuration.reconnect = quickReconnect
    let tls = try f.context(serverName: "127.0.0.1")
    let client = try MQTTClient(configuration, tls: tls)
    try await client.connect()
    // mosquitto's tickets precede its CONNACK on the wire: kept by the time connect returns.
    #expect(tls.keptSessions >= 1)
    /// Resets every connection and waits for the client's `n`th accepted connection.
    func reconnect(_ n: Int) async {
      proxy.resetAll()
      for await state in client.stateChanges {
        if case .connected = state, client.metrics.connections >= n { break }
      }
    }
    let before = f.tpm.commandCount
    for n in 2...4 {
      await reconnect(n)
      try await client.publish(topic: "devices/device-0206/t", payload: Array("m\(n)".utf8))
    }
    #expect(client.metrics.connections == 4)
    #expect(client.metrics.resumedConnections == 3)
    #expect(f.tpm.commandCount == before, "TPM commands over three reconnects")
    #expect(client.metrics.openMetrics().contains("edgekey_mqtt_resumed_connections_total 3"))

    // Renewal: a new key and certificate. The new context has no session: a full handshake, one
    // TPM2_Sign with the new key; reconnects after that resume the new identity's session.
    let (newKey, newTLS) = try f.otherDevice("device-0206")
    // Loaded first, so that a handshake is one command.
    _ = try await newKey.sign(digest: [UInt8](repeating: 1, count: 32), hash: .sha256)
    let commandsBefore = f.tpm.commandCount
    client.replaceCredentials(newTLS)
    for await state in client.stateChanges {
      if case .connected = state, client.metrics.connections >= 5 { break }
    }
    #expect(client.metrics.resumedConnections == 3, "the swap's connection was a full handshake")
    #expect(f.tpm.commandCount - commandsBefore == 1, "one TPM2_Sign with the new key")
    #expect(newTLS.keptSessions >= 1)
    await reconnect(6)
    #expect(client.metrics.resumedConnections == 4)
    #expect(f.tpm.commandCount - commandsBefore == 1)
    #expect(newKey.loadCount == 1)
    await client.stop()
  }

  @Test("new credentials take over on the next connection without losing queued messages")
  func credentialSwap() async throws {
    let f = try Fixture(commonName: "device-0204")
    let broker = try f.broker()
    let sinkTLS = try f.softwareParty("sink-0204")
    let sink = try MQTTClient(MQTTConfiguration(host: "127.0.0.1", port: broker.port), tls: sinkTLS)
    try await sink.connect()
    try await sink.subscribe("devices/device-0204/#")
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.clientID = "device-0204"
    configuration.reconnect = quickReconnect
    let client = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    try await client.connect()
    try await client.enqueue(
      (0..<100).map { MQTTMessage(topic: "devices/device-0204/t", payload: Array("a\($0)".utf8), qos: .atLeastOnce) })
    // Renewal: a new key and certificate for the same device.
    let (newKey, newTLS) = try f.otherDevice("device-0204")
    client.replaceCredentials(newTLS)
    try await client.enqueue(
      (0..<100).map { MQTTMessage(topic: "devices/device-0204/t", payload: Array("b\($0)".utf8), qos: .atLeastOnce) })
    try await client.waitUntilDelivered()
    let expected = Set((0..<100).flatMap { ["a\($0)", "b\($0)"] })
    let (got, _) = await drain(sink, expecting: expected, within: 10)
    #expect(expected.subtracting(got).isEmpty)
    #expect(client.metrics.connections == 2)
    #expect(client.metrics.credentialSwaps == 1)
    #expect(client.tls === newTLS)
    await client.stop()
    await sink.stop()
    _ = newKey
  }
}

@Suite("Authorization by identity: the example broker ACL (Examples/broker/acl)")
struct MQTTAuthorizationTests {
  static var exampleACL: String {
    get throws {
      let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
      return try String(contentsOf: root.appendingPathComponent("Examples/broker/acl"), encoding: .utf8)
    }
  }

  @Test(
    "a device publishes under its own prefix only; another device's topic is refused",
    arguments: [
      MQTTProtocolVersion.v5, .v311,
    ])
  func ownPrefixOnly(_ version: MQTTProtocolVersion) async throws {
    let f = try Fixture(commonName: "device-0300")
    let broker = try f.broker(aclFile: try MQTTAuthorizationTests.exampleACL)
    let collector = try MQTTClient(
      MQTTConfiguration(host: "127.0.0.1", port: broker.port), tls: try f.softwareParty("telemetry-collector"))
    try await collector.connect()
    try await collector.subscribe("devices/#")
    var configuration = MQTTConfiguration(host: "127.0.0.1", port: broker.port)
    configuration.protocolVersion = version
    let device = try MQTTClient(configuration, tls: try f.context(serverName: "127.0.0.1"))
    try await device.connect()
    if version == .v5 {
      // MQTT 5 says so: PUBACK with reason 0x87 (not authorized).
      let error = await #expect(throws: MQTTError.self) {
        try await device.publish(topic: "devices/device-0301/telemetry", payload: Array("forged".utf8))
      }
      #expect(error?.kind == .rejected(0x87))
      #expect(device.metrics.messagesDropped["rejected"] == 1)
    } else {
      // MQTT 3.1.1 has no way to say it: the broker acknowledges and drops the message.
      try await device.publish(topic: "devices/device-0301/telemetry", payload: Array("forged".utf8))
    }
    try await device.publish(topic: "devices/device-0300/telemetry", payload: Array("genuine".utf8))
    let got = try await collect(1, from: collector)
    #expect(got.map(\.topic) == ["devices/device-0300/telemetry"])
    #expect(got.first?.payload == Array("genuine".utf8))
    #expect(broker.log.contains("Denied PUBLISH from device-0300"))
    await device.stop()
    await collector.stop()
  }
}
