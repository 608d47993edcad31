import EdgeKeyCore

/// Stops an EST client's transfers and waits from another thread: a `RenewalAgent` being
/// stopped, a daemon shutting down. Transfers notice within about a second (libcurl's progress
/// callback), waits at once. Once cancelled it stays cancelled.
public final class ESTCancellation: @unchecked Sendable {
  // @unchecked: `cancelled` is read and written under `condition`.
  private let condition = Condition()
  private var cancelled = false

  /// A cancellation not yet cancelled.
  public init() {}

  /// Whether `cancel()` was called.
  public var isCancelled: Bool {
    condition.lock()
    defer { condition.unlock() }
    return cancelled
  }

  /// Ends every transfer and wait that watches this cancellation, now and later.
  public func cancel() {
    condition.lock()
    cancelled = true
    condition.broadcast()
    condition.unlock()
  }

  /// Sleeps `delay` (measured on the monotonic clock), or until cancelled.
  public func sleep(_ delay: Duration) {
    condition.lock()
    defer { condition.unlock() }
    let deadline = ContinuousClock.now + delay
    while !cancelled {
      let left = (deadline - ContinuousClock.now).seconds
      if left <= 0 { break }
      condition.wait(seconds: left)
    }
  }
}
