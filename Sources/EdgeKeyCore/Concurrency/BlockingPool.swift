/// Threads of EdgeKey's own for blocking work called from async code (TPM commands, EST, an
/// outbox fsync, joining a thread), so that it never occupies Swift's cooperative pool, which
/// has as many threads as cores (two on a small board).
///
/// A job runs on an idle worker, or on a new one when every worker is busy: a job never waits
/// for another job to finish (a renewal that waits minutes for the server does not hold up a
/// TPM open), so the pool cannot deadlock. Workers are kept for reuse and leave after
/// `idleLifetime` without work, so an idle daemon holds no extra threads.
package final class BlockingPool: @unchecked Sendable {
  // @unchecked: `jobs`, `idle` (workers waiting for a job) and `threads` are guarded by
  // `condition`.
  package static let shared = BlockingPool(name: "edgekey-work")

  private let name: String
  private let idleLifetime: Duration
  private let condition = Condition()
  private var jobs: [@Sendable () -> Void] = []
  private var idle = 0
  private var threads = 0
  private var started = 0

  package init(name: String, idleLifetime: Duration = .seconds(30)) {
    self.name = name
    self.idleLifetime = idleLifetime
  }

  /// Workers alive now, busy or idle.
  package var threadCount: Int {
    condition.lock()
    defer { condition.unlock() }
    return threads
  }

  /// Workers started since the pool was made (reuse keeps this low).
  package var threadsStarted: Int {
    condition.lock()
    defer { condition.unlock() }
    return started
  }

  /// Runs `body` on a worker and returns its result. `onCancel` runs, on whatever thread
  /// cancels the calling task, when the task is cancelled while `body` runs: it should make
  /// `body` end soon (cancel an EST transfer). Without it, `body` runs to its end.
  package func run<T: Sendable, E: Error>(
    onCancel: @escaping @Sendable () -> Void = {}, _ body: @escaping @Sendable () throws(E) -> T
  ) async throws(E) -> T {
    let result: Result<T, E> = await withTaskCancellationHandler {
      await withCheckedContinuation { (continuation: CheckedContinuation<Result<T, E>, Never>) in
        submit {
          let result: Result<T, E>
          do throws(E) { result = .success(try body()) } catch { result = .failure(error) }
          continuation.resume(returning: result)
        }
      }
    } onCancel: {
      onCancel()
    }
    return try result.get()
  }

  /// Runs `job` on a worker and returns at once (for work that resumes a continuation itself).
  package func execute(_ job: @escaping @Sendable () -> Void) { submit(job) }

  private func submit(_ job: @escaping @Sendable () -> Void) {
    condition.lock()
    jobs.append(job)
    // Every queued job has a waiting worker of its own, or a new one: none waits behind another.
    let spawn = jobs.count > idle
    if spawn {
      threads += 1
      started += 1
    } else {
      condition.signal()
    }
    condition.unlock()
    if spawn { Threads.detach(name: name) { [self] in work() } }
  }

  private func work() {
    condition.lock()
    while true {
      if !jobs.isEmpty {
        let job = jobs.removeFirst()
        condition.unlock()
        job()
        condition.lock()
        continue
      }
      idle += 1
      let deadline = ContinuousClock.now + idleLifetime
      while jobs.isEmpty {
        let left = (deadline - ContinuousClock.now).seconds
        if left <= 0 { break }
        condition.wait(seconds: left)
      }
      idle -= 1
      if jobs.isEmpty {
        threads -= 1
        condition.unlock()
        return
      }
    }
  }
}
