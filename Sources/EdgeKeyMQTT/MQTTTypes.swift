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

/// An MQTT 5 user property: a name and value pair (MQTT 5 §3.1.2.11.8).
public struct MQTTUserProperty: Sendable, Equatable {
  /// The name; it may repeat within a packet.
  public var name: String
  /// The value.
  public var value: String

  /// A property `name` = `value`.
  public init(_ name: String, _ value: String) {
    self.name = name
    self.value = value
  }
}

/// What the broker's CONNACK said about the session and its limits (MQTT 5 §3.2.2.3; for MQTT
/// 3.1.1 only `sessionPresent` comes from the broker and the rest are the protocol's defaults).
/// The client keeps to them: it never has more messages in flight than `receiveMaximum`; a
/// message with a QoS above `maximumQoS` or larger than `maximumPacketSize` is dropped as
/// "unsendable" (its `publish` throws `.dropped`), never retried; a retained message goes
/// without the retain flag when `retainAvailable` is false (libmosquitto clears it: the broker
/// would end the connection over it); no topic alias is ever sent, so any
/// `topicAliasMaximum` is kept to; it pings within `keepAlive`; and its next connection uses
/// `clientID`.
public struct MQTTConnack: Sendable, Equatable {
  /// The protocol version of the connection.
  public var version: MQTTProtocolVersion
  /// The broker resumed a session it kept for this client id.
  public var sessionPresent: Bool
  /// The client id in use: ours, or the one the broker assigned (`assignedClientID`).
  public var clientID: String
  /// The broker assigned `clientID` (we sent an empty one).
  public var assignedClientID: Bool
  /// How long the broker keeps the session after the connection ends (MQTT 5; nil when the
  /// session ends with the connection, 3.1.1 included).
  public var sessionExpiry: Duration?
  /// The keep alive in force: the broker's Server Keep Alive if it sent one, else ours.
  public var keepAlive: Duration
  /// How many QoS ≥ 1 messages we may have in flight to the broker (65535 when not limited).
  public var receiveMaximum: Int
  /// The highest QoS the broker accepts from us.
  public var maximumQoS: MQTTQoS
  /// Whether the broker accepts retained messages.
  public var retainAvailable: Bool
  /// The highest topic alias the broker accepts (0: none; we use none either way).
  public var topicAliasMaximum: Int
  /// The largest packet the broker accepts, when it said.
  public var maximumPacketSize: Int?
  /// The broker's user properties, in order.
  public var userProperties: [MQTTUserProperty]
}

/// Options for `MQTTClient`.
public struct MQTTConfiguration: Sendable {
  /// Tried in turn: after a failure the next one is used.
  public var endpoints: [MQTTEndpoint]
  /// Defaults to the common name of the TLS identity's certificate. Empty: an MQTT 5 broker
  /// assigns one (`MQTTConnack.clientID`), which every later connection then sends.
  public var clientID: String?
  /// The MQTT version to speak.
  public var protocolVersion: MQTTProtocolVersion = .automatic
  /// Whole seconds: zero (off) or 5 to 65535 s. A broker silent for 1.5 × keepAlive is given
  /// up on.
  public var keepAlive: Duration = .seconds(60)
  /// MQTT 3.1.1 clean session / MQTT 5 clean start: true starts every connection with a new,
  /// empty session. False resumes the broker's session for this client id: its subscriptions,
  /// and the QoS ≥ 1 messages that arrived for it while it was away.
  public var cleanSession = true
  /// MQTT 5: how long the broker keeps the session after the connection ends (the Session
  /// Expiry Interval, whole seconds). Nil: none with `cleanSession` (the session ends with the
  /// connection), and for as long as the broker allows without it (0xFFFFFFFF: what MQTT 3.1.1's
  /// clean session false means). The broker may grant less: see `MQTTConnack.sessionExpiry`.
  public var sessionExpiry: Duration?
  /// MQTT 5: how many QoS ≥ 1 messages the broker may have in flight to us at once (Receive
  /// Maximum, 1 to 65535). Nil: libmosquitto's default, 20.
  public var receiveMaximum: UInt16?
  /// MQTT 5: the largest packet we accept (Maximum Packet Size, bytes). Nil: no limit sent.
  public var maximumPacketSize: UInt32?
  /// MQTT 5: user properties sent with CONNECT, in order (a name may repeat).
  public var connectUserProperties: [MQTTUserProperty] = []
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

extension MQTTConfiguration {
  /// The Session Expiry Interval CONNECT sends (MQTT 5), in seconds.
  var sessionExpirySeconds: UInt32 {
    if let sessionExpiry { return UInt32(clamping: sessionExpiry.components.seconds) }
    return cleanSession ? 0 : UInt32.max
  }

  /// Refuses, before any connection, what libmosquitto or the protocol would refuse later.
  func checkConnectProperties() throws(MQTTError) {
    if let sessionExpiry {
      let c = sessionExpiry.components
      guard c.attoseconds == 0, c.seconds >= 0, c.seconds <= Int64(UInt32.max) else {
        throw MQTTError(
          kind: .invalidArgument,
          reason: "sessionExpiry \(sessionExpiry.secondsText): whole seconds, 0 to \(UInt32.max) (MQTT 5 §3.1.2.11.2)")
      }
    }
    if receiveMaximum == 0 {
      throw MQTTError(kind: .invalidArgument, reason: "receiveMaximum 0: 1 to 65535 (MQTT 5 §3.1.2.11.3)")
    }
    if maximumPacketSize == 0 {
      throw MQTTError(kind: .invalidArgument, reason: "maximumPacketSize 0: at least 1 (MQTT 5 §3.1.2.11.4)")
    }
    for p in connectUserProperties {
      for text in [p.name, p.value] where text.utf8.count > 65535 || text.utf8.contains(0) {
        throw MQTTError(
          kind: .invalidArgument,
          reason: "user property \"\(p.name.prefix(40))\": a UTF-8 string of at most 65535 bytes without U+0000")
      }
    }
  }
}
