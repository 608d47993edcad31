import EdgeKeyCore
import Testing

/// Blocks its callers until `parties` of them have arrived (or `limit` passed: then false).
private final class Barrier: @unchecked Sendable {
  // @unchecked: `arrived` is guarded by `condition`.
  private let condition = Condition()
  private var arrived = 0
  private let parties: Int

  init(parties: Int) { self.parties = parties }

  func arrive(limit: Duration = .seconds(60)) -> Bool {
    condition.lock()
    defer { condition.unlock() }
    arrived += 1
    condition.broadcast()
    let deadline = ContinuousClock.now + limit
    while arrived < parties {
      let left = (deadline - ContinuousClock.now).seconds
      if left <= 0 { return false }
      condition.wait(seconds: left)
    }
    return true
  }
}

/// A flag a job waits on, set by a cancellation handler.
private final class Flag: @unchecked Sendable {
  // @unchecked: `set` is guarded by `condition`.
  private let condition = Condition()
  private var set = false

  func raise() {
    condition.lock()
    set = true
    condition.broadcast()
    condition.unlock()
  }

  func wait(limit: Duration = .seconds(60)) -> Bool {
    condition.lock()
    defer { condition.unlock() }
    let deadline = ContinuousClock.now + limit
    while !set {
      let left = (deadline - ContinuousClock.now).seconds
      if left <= 0 { return false }
      condition.wait(seconds: left)
    }
    return true
  }
}

@Suite("the blocking pool: EdgeKey's own threads for blocking work called from async code")
struct BlockingPoolTests {
  @Test("jobs that block run side by side: none waits behind another (a long renewal never holds up a TPM open)")
  func noJobWaitsBehindAnother() async {
    let pool = BlockingPool(name: "test-pool")
    // Each job returns only once all six are running at once; a pool that queued any of them
    // behind another would leave the barrier short until its limit.
    let barrier = Barrier(parties: 6)
    let results = await withTaskGroup(of: Bool.self) { group in
      for _ in 0..<6 { group.addTask { await pool.run { barrier.arrive() } } }
      return await group.reduce(into: [Bool]()) { $0.append($1) }
    }
    #expect(results == Array(repeating: true, count: 6))
  }

  @Test("workers are reused, and leave once idle, so an idle daemon holds no extra thread")
  func reuseAndIdleExit() async throws {
    let pool = BlockingPool(name: "test-pool", idleLifetime: .milliseconds(200))
    for i in 0..<200 {
      let value = await pool.run { i * 2 }
      #expect(value == i * 2)
    }
    // One call at a time: a thread per call would have started 200.
    #expect(pool.threadsStarted <= 10, "\(pool.threadsStarted) threads for 200 calls made one after another")
    while pool.threadCount > 0 { try await ContinuousClock().sleep(for: .milliseconds(20)) }
    #expect(pool.threadCount == 0)
    #expect(await pool.run { 7 } == 7, "a pool whose workers left starts a new one")
  }

  @Test("typed errors come back whole; cancelling the caller runs onCancel, which ends the job")
  func errorsAndCancellation() async {
    struct Refused: Error, Equatable { var code: Int }
    let pool = BlockingPool(name: "test-pool")
    let error = await #expect(throws: Refused.self) {
      try await pool.run { () throws(Refused) -> Int in throw Refused(code: 7) }
    }
    #expect(error == Refused(code: 7))

    let flag = Flag()
    let started = Flag()
    let task = Task {
      await pool.run(onCancel: { flag.raise() }) { () -> Bool in
        started.raise()
        return flag.wait()
      }
    }
    #expect(started.wait())
    task.cancel()
    #expect(await task.value, "the job ended because onCancel ran, not because its wait ran out")
  }
}
