import EdgeKeyCore
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

/// Hands each credential the renewal agent installs to an MQTT client, and tells the agent once
/// the client has connected with it, which retires the previous key. Messages queued in the
/// client's outbox wait through the reconnection.
///
///     let switcher = MQTTCredentialSwitch(policy: tlsPolicy)
///     let agent = RenewalAgent(..., install: switcher.install)
///     let client = try MQTTClient(configuration, tls: ..., outbox: outbox)
///     switcher.attach(client, agent: agent)
///     agent.start()
public final class MQTTCredentialSwitch: @unchecked Sendable {
  // @unchecked: the mutable references are only touched under `lock`.
  /// The broker's side of each new context (its CA, name, CRLs).
  public var policy: TLSPolicy { lock.withLock { currentPolicy } }
  private var currentPolicy: TLSPolicy
  /// How long to wait for the client to connect with a new credential before leaving the
  /// previous one in place (it is retired at the next successful switch).
  public var confirmationTimeout: TimeInterval
  private let lock = Lock()
  private var client: MQTTClient?
  private weak var agent: RenewalAgent?

  public init(policy: TLSPolicy, confirmationTimeout: TimeInterval = 30) {
    currentPolicy = policy
    self.confirmationTimeout = confirmationTimeout
  }

  public func attach(_ client: MQTTClient, agent: RenewalAgent) {
    lock.lock()
    self.client = client
    self.agent = agent
    lock.unlock()
  }

  /// From now on, contexts are made with `policy` (fresh CRLs); the client's current one is
  /// remade with it for its next connection, without dropping the one it has.
  public func update(policy: TLSPolicy, current: (Credential, TPMKey)?) {
    lock.lock()
    currentPolicy = policy
    let client = self.client
    lock.unlock()
    guard let client, let (credential, key) = current,
      let context = try? TLSClientContext(certificateChain: credential.chain, key: key, policy: policy)
    else { return }
    client.replaceCredentials(context, reconnect: false)
  }

  /// The agent's `install`: builds the TLS context, swaps it into the client, waits (on the
  /// agent's thread) until the client is connected with it, then confirms it to the agent.
  @Sendable public func install(_ credential: Credential, _ key: TPMKey) {
    lock.lock()
    let (client, agent) = (self.client, self.agent)
    lock.unlock()
    guard let client, let agent,
      let context = try? TLSClientContext(certificateChain: credential.chain, key: key, policy: policy)
    else { return }
    let before = client.metrics.connections
    client.replaceCredentials(context)
    let deadline = Date().addingTimeInterval(confirmationTimeout)
    while Date() < deadline {
      if client.isConnected && client.metrics.connections > before && client.tls === context {
        try? agent.confirmInUse()
        return
      }
      Threads.sleep(0.02)
    }
  }
}
