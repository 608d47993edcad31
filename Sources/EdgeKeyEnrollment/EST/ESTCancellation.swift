import EdgeKeyCore

/// Stops an EST client's transfers and waits from another thread: a `RenewalAgent` being
/// stopped, a daemon shutting down. Transfers notice within about a second (libcurl's progress
/// callback), waits at once. Once cancelled it stays cancelled.
public final class ESTCancellation: @unchecked Sendable {
  // @unchecked: `cancelled` and `children` are read and written under `condition`.
  private let condition = Condition()
  private var cancelled = false
  private var children: [Weak] = []

  private struct Weak {
    weak var value: ESTCancellation?
  }

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
    let children = self.children.compactMap(\.value)
    self.children = []
    condition.unlock()
    for child in children { child.cancel() }
  }

  /// A cancellation of its own (for one call) that this one's `cancel()` cancels too: already
  /// cancelled when this one is.
  package func child() -> ESTCancellation {
    let child = ESTCancellation()
    condition.lock()
    let already = cancelled
    if !already {
      children.removeAll { $0.value == nil }
      children.append(Weak(value: child))
    }
    condition.unlock()
    if already { child.cancel() }
    return child
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
