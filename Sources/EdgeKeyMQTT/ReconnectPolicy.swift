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
  public var initialDelay: Double
  public var maximumDelay: Double
  public var multiplier: Double
  public var stableAfter: Double
  public var refusedInitialDelay: Double
  public var refusedMaximumDelay: Double

  public init(
    initialDelay: Double = 1, maximumDelay: Double = 120, multiplier: Double = 2, stableAfter: Double = 60,
    refusedInitialDelay: Double = 300, refusedMaximumDelay: Double = 3600
  ) {
    self.initialDelay = initialDelay
    self.maximumDelay = maximumDelay
    self.multiplier = multiplier
    self.stableAfter = stableAfter
    self.refusedInitialDelay = refusedInitialDelay
    self.refusedMaximumDelay = refusedMaximumDelay
  }

  /// The bound for the `failures`-th consecutive failure (1-based).
  public func bound(failures: Int, refused: Bool) -> Double {
    let (start, cap) = refused ? (refusedInitialDelay, refusedMaximumDelay) : (initialDelay, maximumDelay)
    var d = start
    var n = 1
    while n < failures && d < cap {
      d *= max(multiplier, 1)
      n += 1
    }
    return min(d, cap)
  }

  /// The delay before the next attempt; `random` is uniform in [0, 1).
  public func delay(failures: Int, refused: Bool, random: Double) -> Double {
    let b = bound(failures: failures, refused: refused)
    return refused ? b / 2 + random * b / 2 : random * b
  }
}
