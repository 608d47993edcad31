import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM

#if canImport(Glibc)
  import Glibc
#endif

/// Everything a ``Device`` needs: where its credentials live, the enrollment server, the
/// broker, and who to trust for each.
public struct DeviceConfiguration: Sendable {
  /// The credential store (0700): credentials, the outbox, the attestation key.
  public var stateDirectory: String
  /// The EST server, `https://host[:port]`, and its label if any.
  public var enrollmentServer: String
  /// The EST label (`/.well-known/est/<label>/`), if the server uses one.
  public var enrollmentLabel: String?
  /// Trust for the enrollment server (and the broker unless ``brokerTrustAnchors`` is set).
  public var trustAnchors: [Certificate]
  /// The MQTT connection: the broker(s), tried in order, keep-alive, session, will, reconnect
  /// policy. Its client id, when nil, is the certificate's common name.
  public var mqtt: MQTTConfiguration
  /// Trust for the broker, when it is not ``trustAnchors``.
  public var brokerTrustAnchors: [Certificate]?
  /// The name the broker's certificate must carry; its host name when nil.
  public var brokerServerName: String?
  /// HTTP Basic credentials for enrollment (a device's one-time secret as serial and secret, or
  /// a factory password); sent only over TLS, never logged.
  public var enrollmentPassword: (user: String, password: String)?
  /// The subject to enrol with when the store has no certificate to copy it from.
  public var subject: [(String, String)]?
  /// The TPM: `EDGEKEY_TCTI`, then `TPM2TOOLS_TCTI`, then `/dev/tpmrm0` when nil.
  public var tcti: String?
  /// When and how to renew (rotation, key type, attestation).
  public var renewal = RenewalPolicy()
  /// Keep accepted messages on disk (`outbox.db` in the state directory) until the broker has
  /// them; an in-memory outbox when false.
  public var durableOutbox = true
  /// Messages one subscription holds for a consumer that does not keep up; older ones are
  /// dropped past it (and counted).
  public var subscriptionBuffer = 1024
  /// Write the OpenMetrics text here every ``metricsInterval`` (node_exporter's textfile
  /// collector reads `*.prom` files).
  public var metricsFile: String?
  /// How often ``metricsFile`` is written (and once more at stop).
  public var metricsInterval: Duration = .seconds(15)
  /// Where renewal, EST and MQTT events go (none by default; `verbose = true` in a
  /// configuration file: stderr).
  public var logger: Logger = .disabled

  /// The minimum: the state directory, the EST server (`https://host[:port]`), the anchors that
  /// vouch for it (and the broker), and the broker.
  public init(
    stateDirectory: String, enrollmentServer: String, trustAnchors: [Certificate], broker: MQTTEndpoint
  ) {
    self.stateDirectory = stateDirectory
    self.enrollmentServer = enrollmentServer
    self.trustAnchors = trustAnchors
    self.mqtt = MQTTConfiguration(host: broker.host, port: broker.port)
  }

  /// Reads a configuration file of `name = value` lines (`#` comments), the names of
  /// `edgekey agent`'s options: `state`, `server`, `label`, `cafile`, `host`, `port`,
  /// `broker-cafile`, `server-name`, `id` (the MQTT client id), `password-env` (the variable holding USER:PASSWORD),
  /// `subject` (`O=Acme,CN=device-1`), `tcti`, `attest` (true/false), `metrics-file`, `verbose`
  /// (true: renewal and EST events on stderr). Every
  /// problem names the file and line.
  public init(contentsOf path: String) throws(EdgeKeyError) {
    let file: ConfigFile
    do { file = try ConfigFile(contentsOf: path) } catch {
      throw EdgeKeyError(.configuration, layer: .configuration, reason: "\(error)")
    }
    func required(_ key: String) throws(EdgeKeyError) -> String {
      guard let value = file[key], !value.isEmpty else {
        throw EdgeKeyError(.configuration, layer: .configuration, reason: "\(path): `\(key) = ...` is missing")
      }
      return value
    }
    func anchors(_ key: String) throws(EdgeKeyError) -> [Certificate] {
      let file = try required(key)
      do {
        let chain = try Certificate.chain(
          pem: String(decoding: try AtomicFile.read(file, limit: 1 << 20), as: UTF8.self))
        guard !chain.isEmpty else { throw TLSError(.configuration, .other, "no certificate in it") }
        return chain
      } catch {
        throw EdgeKeyError(.configuration, layer: .configuration, reason: "\(path): \(key) \(file): \(error)")
      }
    }
    let host = try required("host")
    guard let port = UInt16(file["port"] ?? "8883") else {
      throw EdgeKeyError(.configuration, layer: .configuration, reason: "\(path): port is not a port number")
    }
    self.init(
      stateDirectory: try required("state"), enrollmentServer: try required("server"),
      trustAnchors: try anchors("cafile"), broker: MQTTEndpoint(host: host, port: port))
    enrollmentLabel = file["label"]
    if file["broker-cafile"] != nil { brokerTrustAnchors = try anchors("broker-cafile") }
    brokerServerName = file["server-name"]
    mqtt.clientID = file["id"]
    tcti = file["tcti"]
    metricsFile = file["metrics-file"]
    if file["verbose"] == "true" {
      logger = Logger(label: "edgekey", level: .info, handler: StandardErrorLogHandler())
    }
    renewal.attest = file["attest"] == "true"
    if let variable = file["password-env"] {
      guard let value = getenv(variable).map({ String(cString: $0) }), let colon = value.firstIndex(of: ":") else {
        throw EdgeKeyError(
          .configuration, layer: .configuration, reason: "\(path): the variable \(variable) does not hold USER:PASSWORD"
        )
      }
      enrollmentPassword = (String(value[..<colon]), String(value[value.index(after: colon)...]))
    }
    if let text = file["subject"] {
      var fields: [(String, String)] = []
      for part in text.split(separator: ",") {
        guard let eq = part.firstIndex(of: "=") else {
          throw EdgeKeyError(
            .configuration, layer: .configuration, reason: "\(path): subject part \(part) is not NAME=value")
        }
        fields.append(
          (String(part[..<eq]).trimmingSpaces(), String(part[part.index(after: eq)...]).trimmingSpaces()))
      }
      subject = fields
    }
  }
}
