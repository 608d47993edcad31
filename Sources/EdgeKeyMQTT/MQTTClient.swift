import CMosquitto
import EdgeKeyCore
import EdgeKeyTLS
import Foundation

/// A message received on a subscription.
public struct MQTTMessage: Sendable, Equatable {
  public var topic: String
  public var payload: [UInt8]
  public var qos: MQTTQoS
  public var retain: Bool
}

public enum MQTTQoS: Int32, Sendable, Equatable {
  case atMostOnce = 0
  case atLeastOnce = 1
  case exactlyOnce = 2
}

public enum MQTTProtocolVersion: Int32, Sendable {
  case v311 = 4
  case v5 = 5
}

/// A failure of the MQTT layer: libmosquitto's error or the broker's reason code.
public struct MQTTError: Error, CustomStringConvertible, Sendable, Equatable {
  public enum Kind: Sendable, Equatable {
    /// The broker refused the connection (CONNACK return/reason code).
    case connectionRefused(Int32)
    /// The connection could not be made or was lost (libmosquitto error code).
    case connectionFailed(Int32)
    /// The broker answered an operation with a failure reason code (MQTT 5).
    case rejected(Int32)
    case timedOut
    case notConnected
    case invalidArgument
  }
  public var kind: Kind
  public var reason: String
  public var description: String { "MQTT: \(reason)" }
}

/// Options for `MQTTClient`.
public struct MQTTConfiguration: Sendable {
  public var host: String
  public var port: UInt16
  /// Defaults to the common name of the TLS identity's certificate.
  public var clientID: String?
  public var protocolVersion: MQTTProtocolVersion = .v5
  public var keepAlive: Int32 = 60
  public var cleanSession = true

  public init(host: String, port: UInt16 = 8883, clientID: String? = nil) {
    self.host = host
    self.port = port
    self.clientID = clientID
  }
}

/// An MQTT client over libmosquitto, authenticated by mutual TLS with a TPM-held key.
///
/// The `TLSClientContext`'s `SSL_CTX` is handed to libmosquitto (`MOSQ_OPT_SSL_CTX`, defaults
/// off), so the key is never reloaded per connect and the host name is still verified (it is
/// set on the context's verify parameters). libmosquitto runs on its own network thread
/// (`mosquitto_loop_start`); the calls made from other threads are the ones libmosquitto
/// documents as thread-safe with that loop (publish, subscribe, disconnect).
///
/// This slice reconnects with libmosquitto's exponential back-off; EdgeKey's jittered
/// reconnect, endpoint rotation and the durable outbox come on top of it.
public final class MQTTClient: @unchecked Sendable {
  // @unchecked: `mosq` is used as libmosquitto allows; all other state is behind `lock`.
  private let mosq: OpaquePointer
  public let configuration: MQTTConfiguration
  public let tls: TLSClientContext
  /// Messages on our subscriptions, in arrival order.
  public let messages: AsyncStream<MQTTMessage>
  private let messageSink: AsyncStream<MQTTMessage>.Continuation
  private let lock = NSLock()
  private var state = State()

  private struct State {
    var connect: CheckedContinuation<Void, any Error>?
    var connected = false
    var publishes: [Int32: CheckedContinuation<Void, any Error>] = [:]
    var finishedPublishes: [Int32: Int32] = [:]
    var subscribes: [Int32: CheckedContinuation<[Int32], any Error>] = [:]
    var finishedSubscribes: [Int32: [Int32]] = [:]
    var loopStarted = false
  }

  private static let libraryInit: Void = { mosquitto_lib_init() }()

  public init(_ configuration: MQTTConfiguration, tls: TLSClientContext) throws(MQTTError) {
    MQTTClient.libraryInit
    self.configuration = configuration
    self.tls = tls
    let clientID = configuration.clientID ?? tls.certificateChain.first?.commonName ?? "edgekey"
    guard let m = mosquitto_new(clientID, configuration.cleanSession, nil) else {
      throw MQTTError(kind: .invalidArgument, reason: "mosquitto_new failed for client id \(clientID)")
    }
    mosq = m
    (messages, messageSink) = AsyncStream.makeStream(of: MQTTMessage.self, bufferingPolicy: .unbounded)
    mosquitto_user_data_set(m, Unmanaged.passUnretained(self).toOpaque())
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, configuration.protocolVersion.rawValue)
    mosquitto_int_option(m, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0)
    mosquitto_void_option(m, MOSQ_OPT_SSL_CTX, UnsafeMutableRawPointer(tls.sslContext))
    mosquitto_reconnect_delay_set(m, 1, 60, true)
    mosquitto_connect_v5_callback_set(m) { _, obj, rc, _, _ in MQTTClient.from(obj).didConnect(rc) }
    mosquitto_disconnect_v5_callback_set(m) { _, obj, rc, _ in MQTTClient.from(obj).didDisconnect(rc) }
    mosquitto_publish_v5_callback_set(m) { _, obj, mid, reason, _ in MQTTClient.from(obj).didPublish(mid, reason) }
    mosquitto_subscribe_v5_callback_set(m) { _, obj, mid, count, granted, _ in
      let qos = (0..<Int(count)).map { granted?[$0] ?? 0x80 }
      MQTTClient.from(obj).didSubscribe(mid, qos)
    }
    mosquitto_message_v5_callback_set(m) { _, obj, message, _ in
      guard let message else { return }
      MQTTClient.from(obj).didReceive(message.pointee)
    }
  }

  deinit {
    mosquitto_disconnect(mosq)
    if state.loopStarted { mosquitto_loop_stop(mosq, true) }
    mosquitto_destroy(mosq)
    messageSink.finish()
  }

  private static func from(_ obj: UnsafeMutableRawPointer?) -> MQTTClient {
    Unmanaged<MQTTClient>.fromOpaque(obj!).takeUnretainedValue()
  }

  /// True while the broker has accepted us and the connection is up.
  public var isConnected: Bool { lock.withLock { state.connected } }

  /// Connects (TCP, the mTLS handshake with one TPM signature, CONNECT/CONNACK).
  public func connect(timeout: Double = 15) async throws {
    let what = "connecting to \(configuration.host):\(configuration.port)"
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
      self.lock.withLock { self.state.connect = c }
      DispatchQueue.global().asyncAfter(deadline: .now() + timeout) { [weak self] in
        guard let self else { return }
        let pending = self.lock.withLock { () -> CheckedContinuation<Void, any Error>? in
          defer { self.state.connect = nil }
          return self.state.connect
        }
        pending?.resume(throwing: MQTTError(kind: .timedOut, reason: "timed out after \(timeout) s \(what)"))
      }
      var rc = mosquitto_connect_bind_async(
        self.mosq, self.configuration.host, Int32(self.configuration.port), self.configuration.keepAlive, nil)
      if rc == MOSQ_ERR_SUCCESS.rawValue {
        let start = self.lock.withLock { () -> Bool in
          defer { self.state.loopStarted = true }
          return !self.state.loopStarted
        }
        if start { rc = mosquitto_loop_start(self.mosq) }
      }
      if rc != MOSQ_ERR_SUCCESS.rawValue {
        let pending = self.lock.withLock { () -> CheckedContinuation<Void, any Error>? in
          defer { self.state.connect = nil }
          return self.state.connect
        }
        pending?.resume(throwing: MQTTError(kind: .connectionFailed(rc), reason: MQTTClient.describe(rc)))
      }
    }
  }

  /// Publishes; for QoS 1 and 2 returns when the broker has acknowledged the message.
  public func publish(topic: String, payload: [UInt8], qos: MQTTQoS = .atLeastOnce, retain: Bool = false)
    async throws
  {
    var mid: Int32 = 0
    let rc = payload.withUnsafeBytes {
      mosquitto_publish_v5(mosq, &mid, topic, Int32($0.count), $0.baseAddress, qos.rawValue, retain, nil)
    }
    guard rc == MOSQ_ERR_SUCCESS.rawValue else {
      throw MQTTError(
        kind: rc == MOSQ_ERR_NO_CONN.rawValue ? .notConnected : .connectionFailed(rc), reason: MQTTClient.describe(rc))
    }
    guard qos != .atMostOnce else { return }
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
      let done: Int32? = lock.withLock {
        if let reason = state.finishedPublishes.removeValue(forKey: mid) { return reason }
        state.publishes[mid] = c
        return nil
      }
      if let done { MQTTClient.finishPublish(c, reason: done) }
    }
  }

  /// Subscribes; returns the QoS the broker granted.
  @discardableResult
  public func subscribe(_ filter: String, qos: MQTTQoS = .atLeastOnce) async throws -> MQTTQoS {
    var mid: Int32 = 0
    let rc = mosquitto_subscribe_v5(mosq, &mid, filter, qos.rawValue, 0, nil)
    guard rc == MOSQ_ERR_SUCCESS.rawValue else {
      throw MQTTError(kind: .connectionFailed(rc), reason: MQTTClient.describe(rc))
    }
    let granted = try await withCheckedThrowingContinuation { (c: CheckedContinuation<[Int32], any Error>) in
      let done: [Int32]? = lock.withLock {
        if let qos = state.finishedSubscribes.removeValue(forKey: mid) { return qos }
        state.subscribes[mid] = c
        return nil
      }
      if let done { c.resume(returning: done) }
    }
    guard let first = granted.first, let result = MQTTQoS(rawValue: first) else {
      throw MQTTError(
        kind: .rejected(granted.first ?? 0x80), reason: "the broker refused the subscription to \(filter)")
    }
    return result
  }

  /// Disconnects cleanly.
  public func disconnect() {
    mosquitto_disconnect(mosq)
  }

  // MARK: - Callbacks (libmosquitto's network thread)

  private func didConnect(_ rc: Int32) {
    let c = lock.withLock { () -> CheckedContinuation<Void, any Error>? in
      state.connected = rc == 0
      defer { state.connect = nil }
      return state.connect
    }
    if rc == 0 {
      c?.resume()
    } else {
      let text = String(cString: mosquitto_connack_string(rc))
      c?.resume(throwing: MQTTError(kind: .connectionRefused(rc), reason: "the broker refused the connection: \(text)"))
    }
  }

  private func didDisconnect(_ rc: Int32) {
    // QoS >= 1 messages stay queued in libmosquitto and are resent after the reconnect; their
    // acknowledgements still complete the waiting publishers.
    let connect = lock.withLock { () -> CheckedContinuation<Void, any Error>? in
      state.connected = false
      defer { state.connect = nil }
      return state.connect
    }
    // A disconnect before CONNACK: the handshake or the connection failed.
    connect?.resume(
      throwing: MQTTError(kind: .connectionFailed(rc), reason: "the connection ended: \(MQTTClient.describe(rc))"))
  }

  private func didPublish(_ mid: Int32, _ reason: Int32) {
    let c = lock.withLock { () -> CheckedContinuation<Void, any Error>? in
      if let c = state.publishes.removeValue(forKey: mid) { return c }
      state.finishedPublishes[mid] = reason
      return nil
    }
    if let c { MQTTClient.finishPublish(c, reason: reason) }
  }

  private static func finishPublish(_ c: CheckedContinuation<Void, any Error>, reason: Int32) {
    if reason < 0x80 {
      c.resume()
    } else {
      c.resume(
        throwing: MQTTError(kind: .rejected(reason), reason: "the broker refused the message (reason \(reason))"))
    }
  }

  private func didSubscribe(_ mid: Int32, _ granted: [Int32]) {
    let c = lock.withLock { () -> CheckedContinuation<[Int32], any Error>? in
      if let c = state.subscribes.removeValue(forKey: mid) { return c }
      state.finishedSubscribes[mid] = granted
      return nil
    }
    c?.resume(returning: granted)
  }

  private func didReceive(_ m: mosquitto_message) {
    let payload =
      m.payload.map { Array(UnsafeRawBufferPointer(start: $0, count: Int(m.payloadlen))) } ?? []
    messageSink.yield(
      MQTTMessage(
        topic: String(cString: m.topic), payload: payload, qos: MQTTQoS(rawValue: m.qos) ?? .atMostOnce,
        retain: m.retain))
  }

  static func describe(_ rc: Int32) -> String { String(cString: mosquitto_strerror(rc)) }
}
