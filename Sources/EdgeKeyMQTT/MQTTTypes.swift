import EdgeKeyTLS
import FoundationEssentials

/// A message received on a subscription.
public struct MQTTMessage: Sendable, Equatable {
  /// The topic name (no wildcards).
  public var topic: String
  /// The payload bytes (not necessarily UTF-8).
  public var payload: [UInt8]
  /// The delivery guarantee.
  public var qos: MQTTQoS
  /// Whether the broker keeps it for later subscribers.
  public var retain: Bool

  /// A message for `topic`.
  public init(topic: String, payload: [UInt8], qos: MQTTQoS = .atMostOnce, retain: Bool = false) {
    self.topic = topic
    self.payload = payload
    self.qos = qos
    self.retain = retain
  }
}

/// MQTT's delivery guarantees.
public enum MQTTQoS: Int32, Sendable, Equatable, Comparable {
  /// Sent once, never stored or retried.
  case atMostOnce = 0
  /// Stored until the broker's PUBACK; may arrive twice.
  case atLeastOnce = 1
  /// Stored until the broker's PUBCOMP; arrives once.
  case exactlyOnce = 2

  public static func < (a: MQTTQoS, b: MQTTQoS) -> Bool { a.rawValue < b.rawValue }
}

/// The MQTT version to speak. `.automatic` (the default) starts with MQTT 5 and falls back to
/// 3.1.1 for an endpoint that shows it does not speak 5: it accepts our certificate, then
/// closes the connection after our MQTT 5 CONNECT without a CONNACK, or answers "unacceptable
/// protocol version". `.v5` and `.v311` pin the version.
public enum MQTTProtocolVersion: Sendable, Equatable {
  /// MQTT 3.1.1 only.
  case v311
  /// MQTT 5 only.
  case v5
  /// MQTT 5, falling back to 3.1.1 per endpoint.
  case automatic

  /// MOSQ_OPT_PROTOCOL_VERSION's value for a pinned version (automatic starts with 5).
  var level: Int32 { self == .v311 ? 4 : 5 }
}

/// A failure of the MQTT layer. TLS failures are thrown as `TLSError` (with their layer).
public struct MQTTError: Error, CustomStringConvertible, Sendable, Equatable {
  /// What went wrong.
  public enum Kind: Sendable, Equatable {
    /// The broker refused the connection (CONNACK return code or MQTT 5 reason code).
    case connectionRefused(Int32)
    /// The connection could not be made or was lost (libmosquitto error code).
    case connectionFailed(Int32)
    /// The broker answered an operation with a failure reason code (MQTT 5).
    case rejected(Int32)
    /// A wait (connect, delivery, subscription) ran out.
    case timedOut
    /// A QoS 0 message while offline: QoS 0 is never stored.
    case notConnected
    /// A topic, filter, keep-alive or other argument MQTT does not allow.
    case invalidArgument
    /// The outbox is at its limit and refuses new messages.
    case outboxFull
    /// The message left the outbox unsent: expired, or dropped for room (`.dropOldest`).
    case dropped
    /// The outbox could not be read or written.
    case outbox
    /// The disk is full; the outbox is unchanged.
    case diskFull
    /// The client was stopped.
    case stopped
    /// The broker accepted our certificate, then closed the connection without answering our
    /// MQTT 5 CONNECT (or answered "unacceptable protocol version"): it speaks only 3.1.1.
    case protocolVersionUnsupported
  }
  /// What went wrong.
  public var kind: Kind
  /// Details for a log.
  public var reason: String
  public var description: String { "MQTT: \(reason)" }

  /// Equal when the kinds are (the reason is for people, not for matching).
  public static func == (a: MQTTError, b: MQTTError) -> Bool { a.kind == b.kind }

  /// An error of `kind`.
  public init(kind: Kind, reason: String) {
    self.kind = kind
    self.reason = reason
  }
}

/// One broker address; the client tries its endpoints in turn.
public struct MQTTEndpoint: Sendable, Equatable, CustomStringConvertible {
  /// The broker's host name (verified against its certificate) or IP address.
  public var host: String
  /// The TCP port.
  public var port: UInt16
  /// A broker at `host:port`.
  public init(host: String, port: UInt16 = 8883) {
    self.host = host
    self.port = port
  }
  public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// A last will, published by the broker if we vanish without a DISCONNECT.
public struct MQTTWill: Sendable, Equatable {
  /// Where the broker publishes the will.
  public var topic: String
  /// What it publishes.
  public var payload: [UInt8]
  /// With which QoS.
  public var qos: MQTTQoS
  /// Whether it is retained.
  public var retain: Bool
  /// A will for `topic`.
  public init(topic: String, payload: [UInt8], qos: MQTTQoS = .atLeastOnce, retain: Bool = false) {
    self.topic = topic
    self.payload = payload
    self.qos = qos
    self.retain = retain
  }
}

/// Options for `MQTTClient`.
public struct MQTTConfiguration: Sendable {
  /// Tried in turn: after a failure the next one is used.
  public var endpoints: [MQTTEndpoint]
  /// Defaults to the common name of the TLS identity's certificate.
  public var clientID: String?
  /// The MQTT version to speak.
  public var protocolVersion: MQTTProtocolVersion = .automatic
  /// Whole seconds: zero (off) or 5 to 65535 s. A broker silent for 1.5 × keepAlive is given
  /// up on.
  public var keepAlive: Duration = .seconds(60)
  /// MQTT 3.1.1 clean session / MQTT 5 clean start. A session that outlives the connection
  /// needs MQTT 3.1.1 for now: libmosquitto's asynchronous connect sends no MQTT 5 session
  /// expiry interval, so an MQTT 5 session ends with its connection.
  public var cleanSession = true
  /// Published by the broker when the connection ends without a DISCONNECT.
  public var will: MQTTWill?
  /// When to try again after a failed or lost connection.
  public var reconnect = ReconnectPolicy()
  /// The time TCP, the TLS handshake and CONNACK may take together.
  public var connectTimeout: Duration = .seconds(15)
  /// How many QoS ≥ 1 messages are handed to the network at once (the broker's receive
  /// maximum still applies within it).
  public var inflightWindow = 100
  /// How many received messages `MQTTClient.messages` holds for a consumer that is behind;
  /// beyond it the oldest are dropped, counted (`messagesReceivedDropped`) and logged, so a
  /// consumer that stalls costs bounded memory.
  public var receiveBuffer = 4096

  /// One broker at `host:port`.
  public init(host: String, port: UInt16 = 8883, clientID: String? = nil) {
    endpoints = [MQTTEndpoint(host: host, port: port)]
    self.clientID = clientID
  }

  /// Several brokers, tried in order after a failure.
  public init(endpoints: [MQTTEndpoint], clientID: String? = nil) {
    self.endpoints = endpoints
    self.clientID = clientID
  }

  /// The first endpoint's host.
  public var host: String { endpoints.first?.host ?? "" }
  /// The first endpoint's port.
  public var port: UInt16 { endpoints.first?.port ?? 0 }
}

/// Where the client's connection stands.
public enum MQTTConnectionState: Sendable, Equatable {
  /// Not started.
  case idle
  /// Connecting to this endpoint (TCP, TLS, CONNECT).
  case connecting(MQTTEndpoint)
  /// Connected to this endpoint.
  case connected(MQTTEndpoint)
  /// Waiting `retryIn` before the next attempt, after `reason`.
  case waiting(retryIn: Duration, reason: String)
  /// Stopped; it will not reconnect.
  case stopped
}

/// The last thing that went wrong with the connection, for a status file or a log: when, the
/// layer that failed (a TLS layer such as "server certificate" or "TPM", "mqtt" for the broker's
/// MQTT answer, "network" for a lost connection), and the error's text.
public struct MQTTFailure: Sendable, Equatable {
  /// When it happened.
  public var time: Date
  /// The layer the evidence shows: "network", "mqtt", or a `TLSError.Layer`'s name.
  public var layer: String
  /// What happened, with the certificate's subject, issuer and dates when one was involved.
  public var description: String
}
