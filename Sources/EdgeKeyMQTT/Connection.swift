internal import CMosquitto
import EdgeKeyTLS
import FoundationEssentials

#if canImport(Glibc)
  import Glibc
#endif

/// One connection: a libmosquitto handle made for it with the TLS identity of the moment,
/// driven by the network thread through libmosquitto's external-loop API until it ends.
/// Only the network thread touches it.
final class Connection {
  let engine: Engine
  let endpoint: MQTTEndpoint
  let tls: TLSClientContext
  /// The version this connection speaks (never `.automatic`).
  let version: MQTTProtocolVersion
  private let mosq: OpaquePointer
  private var connectedAt: ContinuousClock.Instant?
  private var ended = false
  private var endCode: Int32 = 0
  private var endErrno: Int32 = 0
  private var refusal: Int32?
  private var tlsFailure: TLSError?
  private var tlsSummary: TLSConnectionSummary?
  private var midToID: [Int32: Int64] = [:]
  private var lastHanded: Int64 = 0
  private var mayHaveMore = true
  private var subscribeMids: [Int32: String] = [:]
  private var acked: [Int64] = []
  private var rejected: [(Int64, Int32)] = []
  /// The broker's Receive Maximum: QoS ≥ 1 messages in flight stay within it.
  private var receiveMaximum = 65535

  /// The first connection in 3.1.1 after the automatic version fell back: counted on CONNACK.
  private let countsFallback: Bool

  init(
    engine: Engine, tls: TLSClientContext, endpoint: MQTTEndpoint, version: MQTTProtocolVersion,
    countsFallback: Bool = false
  ) throws(MQTTError) {
    self.countsFallback = countsFallback
    self.engine = engine
    self.tls = tls
    self.endpoint = endpoint
    self.version = version
    let configuration = engine.configuration
    let clientID = engine.nextClientID
    // An empty id asks an MQTT 5 broker to assign one (libmosquitto takes it as NULL).
    // mosquitto_new ignores SIGPIPE for the whole process; EdgeKey leaves the disposition as the
    // application set it (every TLS write goes through a MSG_NOSIGNAL BIO, edgekey_tls.h).
    var disposition = sigaction()
    sigaction(SIGPIPE, nil, &disposition)
    let made = mosquitto_new(clientID.isEmpty ? nil : clientID, configuration.cleanSession, nil)
    sigaction(SIGPIPE, &disposition, nil)
    guard let m = made else {
      throw MQTTError(kind: .invalidArgument, reason: "mosquitto_new failed for client id \(clientID)")
    }
    mosq = m
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, version.level)
    if version == .v5 {
      do {
        try Connection.keepConnectProperties(configuration, in: m)
      } catch {
        mosquitto_destroy(m)
        throw error
      }
    }
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1)
    mosquitto_int_option(m, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0)
    // libmosquitto takes its own reference and drops it in mosquitto_destroy.
    mosquitto_void_option(m, MOSQ_OPT_SSL_CTX, UnsafeMutableRawPointer(tls.sslContext))
    _ = TLSError.lastFailure(of: tls)  // forget an earlier connection's failure and summary
    _ = TLSConnectionSummary.last(of: tls)
    if let will = configuration.will {
      let rc = will.payload.withUnsafeBytes {
        mosquitto_will_set_v5(m, will.topic, Int32($0.count), $0.baseAddress, will.qos.rawValue, will.retain, nil)
      }
      if rc != MOSQ_ERR_SUCCESS.rawValue {
        mosquitto_destroy(m)
        throw MQTTError(kind: .invalidArgument, reason: "the last will was refused: \(Connection.describe(rc))")
      }
    }
    mosquitto_user_data_set(m, Unmanaged.passUnretained(self).toOpaque())
    mosquitto_connect_v5_callback_set(m) { _, obj, rc, flags, properties in
      Connection.from(obj).didConnect(rc, flags: flags, properties: properties)
    }
    mosquitto_disconnect_v5_callback_set(m) { _, obj, rc, _ in Connection.from(obj).didDisconnect(rc) }
    mosquitto_publish_v5_callback_set(m) { _, obj, mid, reason, _ in Connection.from(obj).didPublish(mid, reason) }
    mosquitto_subscribe_v5_callback_set(m) { _, obj, mid, count, granted, _ in
      Connection.from(obj).didSubscribe(mid, count > 0 ? granted?[0] ?? 0x80 : 0x80)
    }
    mosquitto_message_v5_callback_set(m) { _, obj, message, _ in
      guard let message else { return }
      Connection.from(obj).didReceive(message.pointee)
    }
  }

  deinit { mosquitto_destroy(mosq) }

  /// Gives `mosq` the MQTT 5 CONNECT properties that every connect and reconnect sends.
  ///
  /// libmosquitto 2.0 has no asynchronous connect that takes properties (upstream issues 1835
  /// and 2644). `mosquitto_connect_bind_v5` keeps a copy of its properties in the handle before
  /// it looks at the host, and the asynchronous connect sends the copy: given no host, it keeps
  /// them and returns MOSQ_ERR_INVAL without connecting. A test reads the CONNECT that reaches
  /// the broker (`MQTT5SessionTests`), so a libmosquitto that stops doing this fails the suite.
  private static func keepConnectProperties(
    _ configuration: MQTTConfiguration, in m: OpaquePointer
  ) throws(MQTTError) {
    var properties: OpaquePointer?
    defer { mosquitto_property_free_all(&properties) }
    var rc = MOSQ_ERR_SUCCESS.rawValue
    func add(_ result: Int32) { if rc == MOSQ_ERR_SUCCESS.rawValue { rc = result } }
    let expiry = configuration.sessionExpirySeconds
    if expiry > 0 {
      add(mosquitto_property_add_int32(&properties, Int32(MQTT_PROP_SESSION_EXPIRY_INTERVAL.rawValue), expiry))
    }
    if let receiveMaximum = configuration.receiveMaximum {
      add(mosquitto_property_add_int16(&properties, Int32(MQTT_PROP_RECEIVE_MAXIMUM.rawValue), receiveMaximum))
    }
    if let maximumPacketSize = configuration.maximumPacketSize {
      add(
        mosquitto_property_add_int32(&properties, Int32(MQTT_PROP_MAXIMUM_PACKET_SIZE.rawValue), maximumPacketSize))
    }
    for p in configuration.connectUserProperties {
      add(mosquitto_property_add_string_pair(&properties, Int32(MQTT_PROP_USER_PROPERTY.rawValue), p.name, p.value))
    }
    guard rc == MOSQ_ERR_SUCCESS.rawValue else {
      throw MQTTError(kind: .invalidArgument, reason: "a CONNECT property was refused: \(describe(rc))")
    }
    guard properties != nil else { return }
    let keepAlive = Int32(configuration.keepAlive.components.seconds)
    rc = mosquitto_connect_bind_v5(m, nil, 0, keepAlive, nil, properties)
    guard rc == MOSQ_ERR_INVAL.rawValue else {
      throw MQTTError(kind: .invalidArgument, reason: "the CONNECT properties were refused: \(describe(rc))")
    }
  }

  private static func from(_ obj: UnsafeMutableRawPointer?) -> Connection {
    Unmanaged<Connection>.fromOpaque(obj!).takeUnretainedValue()
  }

  static func describe(_ rc: Int32) -> String { String(cString: mosquitto_strerror(rc)) }

  private var isConnected: Bool { connectedAt != nil }

  /// Connects and serves the connection until it ends, is stopped or is replaced.
  func run() -> ConnectionOutcome {
    // libmosquitto makes the SSL and starts its handshake inside this thread's calls: the
    // context keeps and offers this endpoint's sessions (TLSPolicy.resumesSessions).
    tls.withEndpoint("\(endpoint.host):\(endpoint.port)") { serve() }
  }

  private func serve() -> ConnectionOutcome {
    let configuration = engine.configuration
    let rc = mosquitto_connect_bind_async(
      mosq, endpoint.host, Int32(endpoint.port), Int32(configuration.keepAlive.components.seconds), nil)
    guard rc == MOSQ_ERR_SUCCESS.rawValue else {
      // On loopback the whole handshake can happen inside connect_async (it writes CONNECT,
      // which drives SSL_write through the handshake): a refusal surfaces here too.
      let savedErrno = errno
      if let failure = tlsDiagnosis(rc) {
        return .failed(failure, refused: failure.isRefusal, reason: "tls")
      }
      errno = savedErrno
      let error = MQTTError(
        kind: .connectionFailed(rc), reason: "cannot connect to \(endpoint): \(Connection.errnoText(rc))")
      return .failed(error, refused: false, reason: "network")
    }
    // Monotonic: an NTP step during a connection attempt neither shortens nor stretches it.
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: configuration.connectTimeout)
    var disconnectAsked: ContinuousClock.Instant?
    var leaving: ConnectionOutcome?
    var timedOut = false
    loop: while !ended {
      let sock = mosquitto_socket(mosq)
      if sock < 0 { break }
      // libmosquitto's external-loop API drives a pending TLS connect only from loop_read, and
      // reports no wish to write while one is pending: if the TCP connect was not complete when
      // connect_async tried the handshake (a loaded machine), the ClientHello waited for a
      // readable socket that the server, waiting for it, never made readable, until the
      // connect timeout. So while handshaking we poll for what OpenSSL needs, and a writable
      // socket drives the handshake too. (The untrusted-CA flake; LateAcceptProxy repeats it.)
      let progress = mosquitto_ssl_get(mosq).map { TLSHandshakeProgress.of(ssl: OpaquePointer($0)) }
      let handshaking = progress != nil && progress != .finished
      let wantWrite = handshaking ? progress == .waitingToWrite : mosquitto_want_write(mosq)
      var fds = [
        pollfd(fd: sock, events: Int16(POLLIN) | (wantWrite ? Int16(POLLOUT) : 0), revents: 0),
        pollfd(fd: engine.wakeDescriptor, events: Int16(POLLIN), revents: 0),
      ]
      var timeout = 1000.0
      if !isConnected { timeout = min(timeout, max((deadline - clock.now).seconds * 1000, 0)) }
      if poll(&fds, 2, Int32(timeout)) < 0 && errno != EINTR { break }
      if fds[1].revents != 0 { engine.drainWake() }
      if !isConnected && fds[0].revents & Int16(POLLERR | POLLHUP) != 0, let error = Connection.socketError(sock) {
        // A failed TCP connect: libmosquitto 2.0 would keep polling it as "TLS pending".
        errno = error
        noteEnd(MOSQ_ERR_ERRNO.rawValue)
        break
      }
      if !isConnected, let ssl = mosquitto_ssl_get(mosq) {
        // libmosquitto frees the SSL when the read fails: what it recorded is kept here first.
        tlsSummary = TLSConnectionSummary.of(ssl: OpaquePointer(ssl)) ?? tlsSummary
      }
      let readable = fds[0].revents & Int16(POLLIN | POLLERR | POLLHUP) != 0
      if readable || (handshaking && fds[0].revents & Int16(POLLOUT) != 0) {
        let rc = mosquitto_loop_read(mosq, 1)
        if rc != MOSQ_ERR_SUCCESS.rawValue || ended {
          noteEnd(rc)
          break
        }
        if !isConnected && fds[0].revents & Int16(POLLHUP | POLLERR) != 0 {
          // Refused or closed while libmosquitto 2.0 still counts the handshake as pending.
          noteEnd(MOSQ_ERR_CONN_LOST.rawValue)
          break
        }
      }
      let (stopping, swap) = engine.withShared { ($0.stopping, $0.swapRequested) }
      if (stopping || swap) && leaving == nil {
        leaving = stopping ? .stopped : .swapped
        guard isConnected else { break }
        mosquitto_disconnect(mosq)
        disconnectAsked = clock.now
      }
      if isConnected && leaving == nil { pump() }
      if !handshaking && (fds[0].revents & Int16(POLLOUT) != 0 || mosquitto_want_write(mosq)) {
        let rc = mosquitto_loop_write(mosq, 1)
        if rc != MOSQ_ERR_SUCCESS.rawValue || ended {
          noteEnd(rc)
          break
        }
      }
      let rc = mosquitto_loop_misc(mosq)
      if rc != MOSQ_ERR_SUCCESS.rawValue {
        noteEnd(rc)
        break
      }
      flushAcknowledgements()
      if !isConnected && clock.now >= deadline {
        timedOut = true
        break loop
      }
      if let asked = disconnectAsked, clock.now - asked > .seconds(2) { break }
    }
    flushAcknowledgements()
    if let leaving { return leaving }
    if let connectedAt {
      let reason = endCode == 0 ? "the connection ended" : "connection lost: \(endText)"
      return .lost(reason: "\(reason) (\(endpoint))", upFor: ContinuousClock.now - connectedAt)
    }
    if let refusal {
      let v5 = version == .v5
      // 3.1.1 §3.1.2.2: a server that does not speak the requested level answers 0x01; MQTT 5
      // calls it 0x84 (Unsupported Protocol Version).
      // (libmosquitto turns a 3.1.1 broker's v3 CONNACK 0x01 to an MQTT 5 CONNECT into 0x84.)
      if v5 && refusal == 0x84 {
        return .failed(
          MQTTError(
            kind: .protocolVersionUnsupported,
            reason: "\(endpoint) does not accept MQTT \(v5 ? "5" : "3.1.1"): unacceptable protocol version"),
          refused: false, reason: "protocol")
      }
      let text = String(cString: v5 ? mosquitto_reason_string(refusal) : mosquitto_connack_string(refusal))
      // Not authorized, bad credentials, banned, bad authentication method, client id refused.
      let permanent: Set<Int32> = v5 ? [0x85, 0x86, 0x87, 0x8A, 0x8C, 0x84] : [1, 2, 4, 5]
      let error = MQTTError(
        kind: .connectionRefused(refusal), reason: "\(endpoint) refused the connection: \(text) (\(refusal))")
      return .failed(error, refused: permanent.contains(refusal), reason: "refused")
    }
    if let tlsFailure {
      return .failed(tlsFailure, refused: tlsFailure.isRefusal, reason: "tls")
    }
    let summary = tlsSummary ?? TLSConnectionSummary.last(of: tls)
    if timedOut {
      if version == .v5, let summary, summary.serverAcceptedUs, summary.alert == nil {
        // Some 3.1.1-only brokers (amqtt) misread an MQTT 5 CONNECT and wait for bytes that
        // never come: TLS fine, our certificate accepted, then silence.
        let error = MQTTError(
          kind: .timedOut,
          reason: "\(endpoint) accepted our certificate but did not answer our MQTT 5 CONNECT within "
            + "\(configuration.connectTimeout.secondsText): a broker that speaks only MQTT 3.1.1 does this")
        return .failed(error, refused: false, reason: "timeout-after-tls")
      }
      let error = MQTTError(
        kind: .timedOut, reason: "no CONNACK from \(endpoint) within \(configuration.connectTimeout.secondsText)")
      return .failed(error, refused: false, reason: "timeout")
    }
    if let summary, summary.serverAcceptedUs, summary.alert == nil {
      // The server accepted our certificate and then closed without a CONNACK: not a TLS matter,
      // and not our certificate. After an MQTT 5 CONNECT, the mark of a 3.1.1-only broker.
      if version == .v5 {
        return .failed(
          MQTTError(
            kind: .protocolVersionUnsupported,
            reason: "\(endpoint) accepted our certificate, then closed the connection without answering our "
              + "MQTT 5 CONNECT: it speaks MQTT 3.1.1 only (use automatic or 3.1.1)"),
          refused: false, reason: "protocol")
      }
      let error = MQTTError(
        kind: .connectionFailed(endCode),
        reason: "\(endpoint) accepted our certificate, then closed the connection without a CONNACK")
      return .failed(error, refused: false, reason: "network")
    }
    let error = MQTTError(
      kind: .connectionFailed(endCode), reason: "cannot connect to \(endpoint): \(endText)")
    return .failed(error, refused: false, reason: "network")
  }

  private var endText: String {
    endCode == MOSQ_ERR_ERRNO.rawValue ? String(cString: strerror(endErrno)) : Connection.describe(endCode)
  }

  /// The pending error of a socket (a failed non-blocking connect), if any.
  private static func socketError(_ sock: Int32) -> Int32? {
    var error: Int32 = 0
    var length = socklen_t(MemoryLayout<Int32>.size)
    guard getsockopt(sock, SOL_SOCKET, SO_ERROR, &error, &length) == 0, error != 0 else { return nil }
    return error
  }

  private static func errnoText(_ rc: Int32) -> String {
    rc == MOSQ_ERR_ERRNO.rawValue ? String(cString: strerror(errno)) : describe(rc)
  }

  /// Hands queued work to libmosquitto: subscriptions, QoS 0 messages, and outbox messages up
  /// to the in-flight window.
  private func pump() {
    let (subscribes, unsubscribes, atMostOnce, changed) = engine.withShared {
      s -> ([(String, MQTTQoS)], [String], [MQTTMessage], Bool) in
      let subs = s.pendingSubscribes.compactMap { f in s.subscriptions.first { $0.filter == f }.map { (f, $0.qos) } }
      defer {
        s.pendingSubscribes = []
        s.pendingUnsubscribes = []
        s.atMostOnce = []
        s.outboxChanged = false
      }
      return (subs, s.pendingUnsubscribes, s.atMostOnce, s.outboxChanged)
    }
    for (filter, qos) in subscribes {
      var mid: Int32 = 0
      let rc = mosquitto_subscribe_v5(mosq, &mid, filter, qos.rawValue, 0, nil)
      if rc == MOSQ_ERR_SUCCESS.rawValue {
        subscribeMids[mid] = filter
      } else {
        engine.subscribed(filter, granted: 0x80)
      }
    }
    for filter in unsubscribes { mosquitto_unsubscribe_v5(mosq, nil, filter, nil) }
    for m in atMostOnce {
      _ = m.payload.withUnsafeBytes {
        mosquitto_publish_v5(mosq, nil, m.topic, Int32($0.count), $0.baseAddress, 0, m.retain, nil)
      }
    }
    var sent = atMostOnce.count
    var resent = 0
    if changed { mayHaveMore = true }
    let window = max(min(engine.configuration.inflightWindow, receiveMaximum), 1)
    var unsendable: [Int64] = []
    while mayHaveMore && midToID.count < window {
      let wanted = window - midToID.count
      let batch: (messages: [OutboxMessage], expired: [Int64])
      do {
        batch = try engine.outbox.next(after: lastHanded, limit: wanted)
      } catch {
        engine.logger.error("\(error)")
        break
      }
      if !batch.expired.isEmpty { engine.dropped(batch.expired, reason: "expired") }
      if batch.messages.count < wanted { mayHaveMore = false }
      for m in batch.messages {
        lastHanded = m.id
        var mid: Int32 = 0
        let rc = send(m, mid: &mid)
        if rc == MOSQ_ERR_SUCCESS.rawValue {
          midToID[mid] = m.id
          sent += 1
          if !engine.handedBefore.insert(m.id).inserted { resent += 1 }
        } else if Connection.neverSendable(rc) {
          // Too large for the broker, QoS above its maximum, a bad topic: it can never go.
          engine.logger.error("message \(m.id) to \(m.topic) cannot be sent: \(Connection.describe(rc))")
          unsendable.append(m.id)
        } else {
          // The connection broke under the write (a reset: MOSQ_ERR_ERRNO, MOSQ_ERR_TLS, ...):
          // the message stays in the outbox and goes out on the next connection. Found by the
          // connection-reset fault test, which saw such a message dropped as "unsendable".
          return engine.countSent(sent, resent: resent)
        }
      }
      if batch.messages.isEmpty { break }
    }
    if !unsendable.isEmpty {
      try? engine.outbox.remove(unsendable)
      engine.dropped(unsendable, reason: "unsendable")
    }
    engine.countSent(sent, resent: resent)
  }

  /// libmosquitto's answers to a publish that no reconnection can change.
  static func neverSendable(_ rc: Int32) -> Bool {
    [
      MOSQ_ERR_INVAL, MOSQ_ERR_PAYLOAD_SIZE, MOSQ_ERR_NOT_SUPPORTED, MOSQ_ERR_MALFORMED_UTF8,
      MOSQ_ERR_QOS_NOT_SUPPORTED, MOSQ_ERR_OVERSIZE_PACKET, MOSQ_ERR_RETAIN_NOT_SUPPORTED, MOSQ_ERR_TOPIC_ALIAS_INVALID,
    ].contains { $0.rawValue == rc }
  }

  private func send(_ m: OutboxMessage, mid: inout Int32) -> Int32 {
    var properties: OpaquePointer?
    defer { mosquitto_property_free_all(&properties) }
    if version == .v5, let expires = m.expires {
      let left = UInt32(max(1, min(expires.timeIntervalSinceNow.rounded(.up), Double(UInt32.max))))
      mosquitto_property_add_int32(&properties, Int32(MQTT_PROP_MESSAGE_EXPIRY_INTERVAL.rawValue), left)
    }
    return m.payload.withUnsafeBytes {
      mosquitto_publish_v5(mosq, &mid, m.topic, Int32($0.count), $0.baseAddress, m.qos.rawValue, m.retain, properties)
    }
  }

  private func flushAcknowledgements() {
    guard !acked.isEmpty || !rejected.isEmpty else { return }
    engine.acknowledged(acked, rejected: rejected)
    acked.removeAll(keepingCapacity: true)
    rejected.removeAll()
  }

  // MARK: - libmosquitto callbacks (on the network thread, inside loop_read/loop_write)

  private func didConnect(_ rc: Int32, flags: Int32, properties: OpaquePointer?) {
    if rc == 0 {
      connectedAt = ContinuousClock.now
      let resumed =
        mosquitto_ssl_get(mosq).flatMap { TLSConnectionSummary.of(ssl: OpaquePointer($0))?.resumed } ?? false
      let connack = readConnack(sessionPresent: flags & 1 != 0, properties: properties)
      let noSIGPIPE = mosquitto_ssl_get(mosq).map { TLSConnectionSummary.writesWithoutSIGPIPE(ssl: OpaquePointer($0)) }
      engine.withShared { $0.writesWithoutSIGPIPE = noSIGPIPE ?? false }
      receiveMaximum = connack.receiveMaximum
      engine.logger.info(
        "connected to \(endpoint) (MQTT \(version == .v5 ? "5" : "3.1.1"), session "
          + "\(connack.sessionPresent ? "resumed" : "new")\(resumed ? ", TLS session resumed" : ""))")
      engine.connected(endpoint, afterFallback: countsFallback, version: version, resumed: resumed, connack: connack)
    } else {
      refusal = rc
    }
  }

  /// What a successful CONNACK says (MQTT 5 §3.2.2.3), with the protocol's defaults for what
  /// it leaves out.
  private func readConnack(sessionPresent: Bool, properties: OpaquePointer?) -> MQTTConnack {
    let configuration = engine.configuration
    var connack = MQTTConnack(
      version: version, sessionPresent: sessionPresent, clientID: engine.nextClientID, assignedClientID: false,
      sessionExpiry: nil, keepAlive: configuration.keepAlive, receiveMaximum: 65535, maximumQoS: .exactlyOnce,
      retainAvailable: true, topicAliasMaximum: 0, maximumPacketSize: nil, userProperties: [])
    guard version == .v5 else { return connack }
    let sent = configuration.sessionExpirySeconds
    connack.sessionExpiry = sent > 0 ? .seconds(Int64(sent)) : nil
    var u32: UInt32 = 0
    var u16: UInt16 = 0
    var byte: UInt8 = 0
    func id(_ p: mqtt5_property) -> Int32 { Int32(p.rawValue) }
    if mosquitto_property_read_int32(properties, id(MQTT_PROP_SESSION_EXPIRY_INTERVAL), &u32, false) != nil {
      connack.sessionExpiry = u32 > 0 ? .seconds(Int64(u32)) : nil
    }
    var text: UnsafeMutablePointer<CChar>?
    if mosquitto_property_read_string(properties, id(MQTT_PROP_ASSIGNED_CLIENT_IDENTIFIER), &text, false) != nil,
      let text
    {
      connack.clientID = String(decoding: UnsafeRawBufferPointer(start: text, count: strlen(text)), as: UTF8.self)
      connack.assignedClientID = true
      free(text)
    }
    if mosquitto_property_read_int16(properties, id(MQTT_PROP_SERVER_KEEP_ALIVE), &u16, false) != nil {
      connack.keepAlive = .seconds(Int64(u16))
    }
    if mosquitto_property_read_int16(properties, id(MQTT_PROP_RECEIVE_MAXIMUM), &u16, false) != nil, u16 > 0 {
      connack.receiveMaximum = Int(u16)
    }
    if mosquitto_property_read_byte(properties, id(MQTT_PROP_MAXIMUM_QOS), &byte, false) != nil {
      connack.maximumQoS = MQTTQoS(rawValue: Int32(byte)) ?? .atMostOnce
    }
    if mosquitto_property_read_byte(properties, id(MQTT_PROP_RETAIN_AVAILABLE), &byte, false) != nil {
      connack.retainAvailable = byte != 0
    }
    if mosquitto_property_read_int16(properties, id(MQTT_PROP_TOPIC_ALIAS_MAXIMUM), &u16, false) != nil {
      connack.topicAliasMaximum = Int(u16)
    }
    if mosquitto_property_read_int32(properties, id(MQTT_PROP_MAXIMUM_PACKET_SIZE), &u32, false) != nil {
      connack.maximumPacketSize = Int(u32)
    }
    var at = properties
    var first = true
    while true {
      var name: UnsafeMutablePointer<CChar>?
      var value: UnsafeMutablePointer<CChar>?
      guard let found = mosquitto_property_read_string_pair(at, id(MQTT_PROP_USER_PROPERTY), &name, &value, !first)
      else { break }
      if let name, let value {
        connack.userProperties.append(MQTTUserProperty(String(cString: name), String(cString: value)))
      }
      free(name)
      free(value)
      at = found
      first = false
    }
    return connack
  }

  private func didDisconnect(_ rc: Int32) {
    noteEnd(rc)
  }

  /// Records how the connection ended (once), and before CONNACK asks the TLS context why.
  private func noteEnd(_ rc: Int32) {
    guard !ended || (endCode == 0 && rc != 0) else { return }
    let savedErrno = errno
    ended = true
    endCode = rc
    endErrno = savedErrno
    guard !isConnected, refusal == nil, tlsFailure == nil else { return }
    tlsFailure = tlsDiagnosis(rc)
  }

  /// Why a connection that had not reached CONNACK ended, when TLS knows: what the SSL (or,
  /// once libmosquitto has freed it, the context) recorded. Nil for a plain network failure.
  private func tlsDiagnosis(_ rc: Int32) -> TLSError? {
    let savedErrno = errno
    guard let ssl = mosquitto_ssl_get(mosq) else {
      // libmosquitto freed the SSL already (a lost connection): the context kept the reason.
      let recorded = TLSError.lastFailure(of: tls)
      return recorded?.layer == .network && recorded?.code != .closedAfterOurCertificate ? nil : recorded
    }
    errno = savedErrno
    // The handshake (or the first read after it, where TLS 1.3 hears that the server refused
    // our certificate) failed. libmosquitto reports a refusal as MOSQ_ERR_TLS, or, when the
    // server's close overtook its alert, as a protocol error, a reset or a lost connection:
    // what the SSL recorded is the truth in every case.
    let tlsLike = rc == MOSQ_ERR_TLS.rawValue || rc == MOSQ_ERR_PROTOCOL.rawValue
    let diagnosis = TLSError.diagnose(
      ssl: OpaquePointer(ssl), sslError: tlsLike ? 1 : 5 /* SSL_ERROR_SSL : SSL_ERROR_SYSCALL */)
    if diagnosis.layer != .network || diagnosis.code == .closedAfterOurCertificate { return diagnosis }
    if let recorded = TLSError.lastFailure(of: tls),
      recorded.layer != .network || recorded.code == .closedAfterOurCertificate
    {
      return recorded
    }
    return nil
  }

  private func didPublish(_ mid: Int32, _ reason: Int32) {
    guard let id = midToID.removeValue(forKey: mid) else { return }  // QoS 0, or not ours
    engine.handedBefore.remove(id)
    if reason >= 0x80 { rejected.append((id, reason)) } else { acked.append(id) }
  }

  private func didSubscribe(_ mid: Int32, _ granted: Int32) {
    guard let filter = subscribeMids.removeValue(forKey: mid) else { return }
    engine.subscribed(filter, granted: granted)
  }

  private func didReceive(_ m: mosquitto_message) {
    let payload = m.payload.map { Array(UnsafeRawBufferPointer(start: $0, count: Int(m.payloadlen))) } ?? []
    engine.received(
      MQTTMessage(
        topic: String(cString: m.topic), payload: payload, qos: MQTTQoS(rawValue: m.qos) ?? .atMostOnce,
        retain: m.retain))
  }
}
