import EdgeKeyCore
import EdgeKeyEnrollment
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
  public let confirmationTimeout: Duration
  private let lock = Lock()
  private var client: MQTTClient?
  private weak var agent: RenewalAgent?
  private let logger: Logger

  /// - Parameters:
  ///   - policy: the broker's side of each new TLS context (its CA, name, CRLs).
  ///   - confirmationTimeout: how long a new credential may take to connect before the previous
  ///     one is kept.
  ///   - logger: where a context that cannot be made, or a credential not confirmed, is said.
  public init(policy: TLSPolicy, confirmationTimeout: Duration = .seconds(30), logger: Logger = .disabled) {
    currentPolicy = policy
    self.confirmationTimeout = confirmationTimeout
    self.logger = logger
  }

  /// The client to give new credentials to, and the agent to confirm them to.
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
    guard let client, let (credential, key) = current else { return }
    do {
      let context = try TLSClientContext(certificateChain: credential.chain, key: key, policy: policy)
      client.replaceCredentials(context, reconnect: false)
    } catch {
      logger.error("the TLS identity with the new policy could not be made; the previous one stays: \(error)")
    }
  }

  /// The agent's `install`: builds the TLS context, swaps it into the client, waits (on the
  /// agent's thread) until the client is connected with it, then confirms it to the agent.
  @Sendable public func install(_ credential: Credential, _ key: TPMKey) {
    lock.lock()
    let (client, agent) = (self.client, self.agent)
    lock.unlock()
    guard let client, let agent else { return }
    let context: TLSClientContext
    do { context = try TLSClientContext(certificateChain: credential.chain, key: key, policy: policy) } catch {
      // The new credential is stored; the connection keeps the one it has until this works.
      logger.error(
        "the TLS identity for the new certificate could not be made; the connection keeps the previous one: \(error)")
      return
    }
    let before = client.metrics.connections
    client.replaceCredentials(context)
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: confirmationTimeout)
    while clock.now < deadline {
      if client.isConnected && client.metrics.connections > before && client.tls === context {
        do { try agent.confirmInUse() } catch {
          logger.error("the previous credential could not be retired (it is retried at the next switch): \(error)")
        }
        return
      }
      Threads.sleep(0.02)
    }
    logger.warning(
      "the client did not connect with the new certificate within \(confirmationTimeout); the previous key is kept")
  }
}
