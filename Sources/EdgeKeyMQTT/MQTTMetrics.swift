import EdgeKeyCore
import FoundationEssentials

/// Counters of one `MQTTClient`, for a daemon to export.
public struct MQTTMetrics: Sendable, Equatable {
  /// Accepted into the outbox (QoS ≥ 1) or handed to the network (QoS 0).
  public var messagesQueued = 0
  /// PUBLISH packets handed to the network, resends included.
  public var messagesSent = 0
  /// Sent again after a reconnect because no acknowledgement had arrived (possible duplicates).
  public var messagesResent = 0
  /// Acknowledged by the broker (PUBACK, or PUBCOMP for QoS 2).
  public var messagesAcknowledged = 0
  /// Left the outbox unsent, by reason: `full` (dropOldest), `expired`, `rejected` (the
  /// broker's reason code refused it).
  public var messagesDropped: [String: Int] = [:]
  /// Refused by a full outbox (`refuseNew`).
  public var messagesRefused = 0
  /// Messages received on subscriptions.
  public var messagesReceived = 0
  /// Received messages dropped because the consumer of `messages` was too far behind.
  public var messagesReceivedDropped = 0
  /// Connections tried.
  public var connectAttempts = 0
  /// Connections that reached CONNACK success.
  public var connections = 0
  /// Of `connections`, those whose TLS handshake resumed a kept session
  /// (`TLSPolicy.resumesSessions`): no certificate sent, no TPM command.
  public var resumedConnections = 0
  /// Connections lost after CONNACK.
  public var disconnections = 0
  /// Failed attempts by reason (`network`, `refused`, or the TLS error's code).
  public var connectFailures: [String: Int] = [:]
  /// TLS handshakes that failed, by reason (a subset of `connectFailures`).
  public var handshakeFailures: [String: Int] = [:]
  /// Credentials replaced (renewals, key rotations).
  public var credentialSwaps = 0
  /// Endpoints the automatic version fell back to MQTT 3.1.1 for (they do not speak 5).
  public var protocolFallbacks = 0
  /// Messages waiting in the outbox, and their size.
  public var outboxMessages = 0
  /// Bytes of topic and payload in the outbox.
  public var outboxBytes = 0
  /// Seconds until the certificate in use expires (negative once it has).
  public var certificateExpiresIn: Duration = .zero
  /// Whether the client is connected now.
  public var connected = false

  /// All counters at zero.
  public init() {}

  /// Messages dropped, whatever the reason.
  public var messagesDroppedTotal: Int { messagesDropped.values.reduce(0, +) }

  /// The OpenMetrics text exposition (`application/openmetrics-text; version=1.0.0`), ending
  /// in `# EOF`. `labels` are added to every sample (e.g. `["device": "device-0001"]`).
  public func openMetrics(prefix: String = "edgekey_mqtt", labels: [String: String] = [:]) -> String {
    var out = ""
    let base = labels.sorted { $0.key < $1.key }
    func labelText(_ extra: [(String, String)]) -> String {
      let all = base.map { ($0.key, $0.value) } + extra
      guard !all.isEmpty else { return "" }
      return "{" + all.map { "\($0.0)=\"\(MQTTMetrics.escape($0.1))\"" }.joined(separator: ",") + "}"
    }
    func counter(_ name: String, _ help: String, _ value: Int) {
      out += "# TYPE \(prefix)_\(name) counter\n# HELP \(prefix)_\(name) \(help)\n"
      out += "\(prefix)_\(name)_total\(labelText([])) \(value)\n"
    }
    func counters(_ name: String, _ help: String, _ label: String, _ values: [String: Int]) {
      out += "# TYPE \(prefix)_\(name) counter\n# HELP \(prefix)_\(name) \(help)\n"
      for (key, value) in values.sorted(by: { $0.key < $1.key }) {
        out += "\(prefix)_\(name)_total\(labelText([(label, key)])) \(value)\n"
      }
    }
    func gauge(_ name: String, _ help: String, _ value: String) {
      out += "# TYPE \(prefix)_\(name) gauge\n# HELP \(prefix)_\(name) \(help)\n"
      out += "\(prefix)_\(name)\(labelText([])) \(value)\n"
    }
    counter("messages_queued", "Messages accepted for publishing.", messagesQueued)
    counter("messages_sent", "PUBLISH packets handed to the network, resends included.", messagesSent)
    counter("messages_resent", "Messages sent again after a reconnect.", messagesResent)
    counter("messages_acknowledged", "Messages acknowledged by the broker.", messagesAcknowledged)
    counters("messages_dropped", "Messages that left the outbox unsent.", "reason", messagesDropped)
    counter("messages_refused", "Messages refused by a full outbox.", messagesRefused)
    counter("messages_received", "Messages received on subscriptions.", messagesReceived)
    counter(
      "messages_received_dropped", "Received messages dropped: the consumer was too far behind.",
      messagesReceivedDropped)
    counter("connect_attempts", "Connection attempts.", connectAttempts)
    counter("connections", "Connections the broker accepted.", connections)
    counter(
      "resumed_connections", "Accepted connections whose TLS session was resumed (no TPM signature).",
      resumedConnections)
    counter("disconnections", "Connections lost after the broker accepted them.", disconnections)
    counters("connect_failures", "Failed connection attempts by reason.", "reason", connectFailures)
    counters("handshake_failures", "Failed TLS handshakes by reason.", "reason", handshakeFailures)
    counter("credential_swaps", "TLS identities replaced (certificate renewal).", credentialSwaps)
    counter("protocol_fallbacks", "Endpoints spoken to in MQTT 3.1.1 after they refused MQTT 5.", protocolFallbacks)
    gauge("outbox_messages", "Messages waiting for an acknowledgement.", "\(outboxMessages)")
    gauge("outbox_bytes", "Bytes waiting for an acknowledgement.", "\(outboxBytes)")
    gauge("connected", "1 while connected.", connected ? "1" : "0")
    gauge(
      "certificate_expiry_seconds", "Seconds until the client certificate expires.",
      Text.fixed(certificateExpiresIn.seconds))
    out += "# EOF\n"
    return out
  }

  static func escape(_ s: String) -> String {
    var out = ""
    for c in s.unicodeScalars {
      switch c {
      case "\\": out += "\\\\"
      case "\"": out += "\\\""
      case "\n": out += "\\n"
      default: out.unicodeScalars.append(c)
      }
    }
    return out
  }
}
