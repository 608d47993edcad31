import Foundation

/// A task executor with one thread of its own: the jobs of a task that prefers it run there.
private final class ThreadTaskExecutor: TaskExecutor, @unchecked Sendable {
  // @unchecked: `jobs` and `finished` are guarded by `condition`.
  private let condition = NSCondition()
  private var jobs: [UnownedJob] = []
  private var finished = false

  init(name: String) {
    let thread = Thread { [self] in loop() }
    thread.name = name
    thread.start()
  }

  func enqueue(_ job: consuming ExecutorJob) {
    let job = UnownedJob(job)
    condition.lock()
    jobs.append(job)
    condition.signal()
    condition.unlock()
  }

  func finish() {
    condition.lock()
    finished = true
    condition.signal()
    condition.unlock()
  }

  private func loop() {
    while true {
      condition.lock()
      while jobs.isEmpty && !finished { condition.wait() }
      if jobs.isEmpty {
        condition.unlock()
        return
      }
      let job = jobs.removeFirst()
      condition.unlock()
      job.runSynchronously(on: asUnownedTaskExecutor())
    }
  }
}

/// Runs a test body that blocks for long (subprocesses, kills, waits) on a thread of its own,
/// not on one of the cooperative pool's threads, which are as many as the cores (two here):
/// a synchronous test holds one for its whole length, and every async test queues behind it.
/// The body stays in the test's task (its expectations are recorded against the test).
public func onOwnThread<T, E: Error>(
  _ name: String = "test-body", isolation: isolated (any Actor)? = #isolation,
  _ body: () async throws(E) -> T
) async throws(E) -> T {
  let executor = ThreadTaskExecutor(name: name)
  defer { executor.finish() }
  return try await withTaskExecutorPreference(executor, isolation: isolation, operation: body)
}
