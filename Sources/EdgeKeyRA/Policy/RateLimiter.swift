import EdgeKeyCore

/// How many enrollment requests are allowed: a burst of `count`, refilled evenly over `period`.
public struct Rate: Sendable, Equatable {
  /// Requests allowed per period.
  public var count: Int
  /// The period.
  public var period: Duration
  /// `count` requests per `period`.
  public init(count: Int, per period: Duration) {
    self.count = count
    self.period = period
  }

  /// "10/60s", "600/1m", or "off" (nil).
  public init?(parsing text: String) {
    let parts = text.split(separator: "/")
    guard parts.count == 2, let count = Int(parts[0]), count > 0, let unit = parts[1].last else { return nil }
    let scale: Int64
    switch unit {
    case "s": scale = 1
    case "m": scale = 60
    case "h": scale = 3600
    default: return nil
    }
    let amount = Int64(parts[1].dropLast()).map { $0 } ?? (parts[1].count == 1 ? 1 : -1)
    guard amount > 0 else { return nil }
    self.init(count: count, per: .seconds(amount * scale))
  }
}

/// Limits on enrollment requests, per source address and per credential (a device id, a
/// bootstrap certificate, a certificate's name); nil: no limit.
public struct RateLimits: Sendable {
  /// Per client IP address; nil: unlimited.
  public var perSource: Rate? = Rate(count: 600, per: .seconds(60))
  /// Per credential (certificate or user); nil: unlimited.
  public var perCredential: Rate? = Rate(count: 60, per: .seconds(60))
  /// The defaults above.
  public init() {}
}

/// Token buckets on the monotonic clock. The number of buckets is bounded, so that an attacker
/// cycling through credentials cannot grow it without end (full buckets are dropped first).
final class RateLimiter: @unchecked Sendable {
  // @unchecked: `buckets` is guarded by `lock`.
  private struct Bucket {
    var tokens: Double
    var updated: ContinuousClock.Instant
  }
  private let limits: RateLimits
  private let lock = Lock()
  private var buckets: [String: Bucket] = [:]
  private let clock = ContinuousClock()
  private let maximumBuckets = 20_000

  init(_ limits: RateLimits) { self.limits = limits }

  /// Takes one token from the source's bucket and the credential's; nil when both had one,
  /// else the seconds until they will (and nothing is taken).
  func admit(source: String, credential: String) -> Double? {
    lock.withLock {
      let now = clock.now
      var wait = 0.0
      var updates: [(String, Bucket)] = []
      for (key, rate) in [("source \(source)", limits.perSource), (credential, limits.perCredential)] {
        guard let rate else { continue }
        let perSecond = Double(rate.count) / rate.period.seconds
        var bucket = buckets[key] ?? Bucket(tokens: Double(rate.count), updated: now)
        bucket.tokens = min(Double(rate.count), bucket.tokens + (now - bucket.updated).seconds * perSecond)
        bucket.updated = now
        if bucket.tokens < 1 { wait = max(wait, (1 - bucket.tokens) / perSecond) }
        updates.append((key, bucket))
      }
      if wait == 0 { updates = updates.map { ($0.0, Bucket(tokens: $0.1.tokens - 1, updated: $0.1.updated)) } }
      for (key, bucket) in updates { buckets[key] = bucket }
      if buckets.count > maximumBuckets { prune(now) }
      return wait == 0 ? nil : wait
    }
  }

  private func prune(_ now: ContinuousClock.Instant) {
    // Buckets idle long enough to be full again are as good as absent.
    let idle = [limits.perSource, limits.perCredential].compactMap { $0?.period }.max() ?? .seconds(60)
    buckets = buckets.filter { now - $0.value.updated < idle }
    if buckets.count > maximumBuckets { buckets.removeAll() }
  }
}
