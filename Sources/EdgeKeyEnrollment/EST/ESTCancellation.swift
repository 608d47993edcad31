import EdgeKeyCore

/// Stops an EST client's transfers and waits from another thread: a `RenewalAgent` being
/// stopped, a daemon shutting down. Transfers notice within about a second (libcurl's progress
/// callback), waits at once. Once cancelled it stays cancelled.
public final class ESTCancellation: @unchecked Sendable {
  // @unchecked: `cancelled` is read and written under `condition`.
  private let condition = Condition()
  private var cancelled = false

  public init() {}

  public var isCancelled: Bool {
    condition.lock()
    defer { condition.unlock() }
    return cancelled
  }

  public func cancel() {
    condition.lock()
    cancelled = true
    condition.broadcast()
    condition.unlock()
  }

  /// Sleeps `seconds`, or until cancelled.
  public func sleep(_ seconds: Double) {
    condition.lock()
    defer { condition.unlock() }
    var left = seconds
    let start = ContinuousClock.now
    while !cancelled && left > 0 {
      condition.wait(seconds: left)
      let elapsed = ContinuousClock.now - start
      left = seconds - (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }
  }
}
