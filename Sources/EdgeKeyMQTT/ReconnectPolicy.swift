/// When to try again after a failed or lost connection.
///
/// Exponential back-off with full jitter (a uniformly random delay up to the current bound),
/// so that a fleet that lost its broker at the same instant does not come back at the same
/// instant. The bound resets only after a connection has stayed up `stableAfter` seconds, so a
/// connection that flaps does not retry at the initial rate. A refusal (the broker's CONNACK
/// says not authorized or bad credentials, or either side rejected a certificate) is not
/// cured by retrying soon: it waits on a separate, much longer schedule, never less than half
/// of its bound.
public struct ReconnectPolicy: Sendable, Equatable {
  /// The bound after the first failure; it grows by `multiplier` per failure up to `maximumDelay`.
  public var initialDelay: Duration
  /// The largest bound after failures that were not refusals.
  public var maximumDelay: Duration
  /// How much the bound grows per consecutive failure (at least 1).
  public var multiplier: Double
  /// How long a connection must stay up before the failure count starts again.
  public var stableAfter: Duration
  /// The bound after the first refusal.
  public var refusedInitialDelay: Duration
  /// The largest bound after refusals.
  public var refusedMaximumDelay: Duration

  /// A policy; the defaults suit a device on a broker it shares with a fleet.
  public init(
    initialDelay: Duration = .seconds(1), maximumDelay: Duration = .seconds(120), multiplier: Double = 2,
    stableAfter: Duration = .seconds(60), refusedInitialDelay: Duration = .seconds(300),
    refusedMaximumDelay: Duration = .seconds(3600)
  ) {
    self.initialDelay = initialDelay
    self.maximumDelay = maximumDelay
    self.multiplier = multiplier
    self.stableAfter = stableAfter
    self.refusedInitialDelay = refusedInitialDelay
    self.refusedMaximumDelay = refusedMaximumDelay
  }

  /// The bound for the `failures`-th consecutive failure (1-based).
  public func bound(failures: Int, refused: Bool) -> Duration {
    let (start, cap) = refused ? (refusedInitialDelay, refusedMaximumDelay) : (initialDelay, maximumDelay)
    var d = start
    var n = 1
    while n < failures && d < cap {
      d = d * max(multiplier, 1)
      n += 1
    }
    return min(d, cap)
  }

  /// The delay before the next attempt; `random` is uniform in [0, 1).
  public func delay(failures: Int, refused: Bool, random: Double) -> Duration {
    let b = bound(failures: failures, refused: refused)
    return refused ? b / 2 + b * (random / 2) : b * random
  }
}
