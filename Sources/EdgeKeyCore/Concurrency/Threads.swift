#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#endif

/// A pthread mutex: what EdgeKey's classes lock their shared state with. ThreadSanitizer sees
/// it (it does not see `Synchronization.Mutex`'s futex calls on Linux), and it needs no
/// Foundation.
package final class Lock: @unchecked Sendable {
  let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

  package init() { pthread_mutex_init(mutex, nil) }

  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  package func lock() { pthread_mutex_lock(mutex) }
  package func unlock() { pthread_mutex_unlock(mutex) }
  /// Takes the lock if no one holds it; never waits.
  package func tryLock() -> Bool { pthread_mutex_trylock(mutex) == 0 }

  package func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body()
  }
}

/// A `Lock` with a condition variable whose timed waits run on the monotonic clock (a wall
/// clock set back by NTP must not stretch a renewal agent's sleep).
package final class Condition: @unchecked Sendable {
  private let mutex = Lock()
  private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

  package init() {
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(cond, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    pthread_cond_destroy(cond)
    cond.deallocate()
  }

  package func lock() { mutex.lock() }
  package func unlock() { mutex.unlock() }
  package func signal() { pthread_cond_signal(cond) }
  package func broadcast() { pthread_cond_broadcast(cond) }

  /// Waits for a signal; the lock must be held.
  package func wait() { pthread_cond_wait(cond, mutex.mutex) }

  /// Waits for a signal or `seconds`; the lock must be held. False when the time ran out.
  @discardableResult
  package func wait(seconds: Double) -> Bool {
    var deadline = timespec()
    clock_gettime(CLOCK_MONOTONIC, &deadline)
    let whole = Int(max(seconds, 0).rounded(.down))
    let nanoseconds = Int((max(seconds, 0) - Double(whole)) * 1e9)
    deadline.tv_sec += whole
    deadline.tv_nsec += nanoseconds
    if deadline.tv_nsec >= 1_000_000_000 {
      deadline.tv_sec += 1
      deadline.tv_nsec -= 1_000_000_000
    }
    return pthread_cond_timedwait(cond, mutex.mutex, &deadline) == 0
  }
}

/// What a new thread runs, handed over to it retained.
private final class ThreadStart: @unchecked Sendable {
  let name: String
  let body: @Sendable () -> Void
  init(name: String, body: @escaping @Sendable () -> Void) {
    self.name = name
    self.body = body
  }
}

private func threadEntry(_ raw: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
  let start = Unmanaged<ThreadStart>.fromOpaque(raw!).takeRetainedValue()
  Threads.setName(start.name)
  start.body()
  return nil
}

/// Threads of EdgeKey's own (the MQTT network loop, the renewal agent), without Foundation.
package enum Threads {
  /// Runs `body` on a new detached thread named `name` (at most 15 bytes are kept: the kernel's
  /// limit, as `ps -L` and `top -H` show it).
  package static func detach(name: String, _ body: @escaping @Sendable () -> Void) {
    let start = Unmanaged.passRetained(ThreadStart(name: name, body: body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, threadEntry, start)
    if rc != 0 {
      Unmanaged<ThreadStart>.fromOpaque(start).release()
      fatalError("pthread_create failed: \(rc)")
    }
    pthread_detach(thread)
  }

  /// Names the calling thread through /proc/thread-self/comm (pthread_setname_np's own way;
  /// the kernel keeps 15 bytes).
  static func setName(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY)
    guard fd >= 0 else { return }
    defer { close(fd) }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
  }

  /// Sleeps the calling thread for `seconds`, resuming after a signal interrupts it.
  package static func sleep(_ seconds: Double) {
    guard seconds > 0 else { return }
    var left = timespec(
      tv_sec: Int(seconds.rounded(.down)), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
    var rest = timespec()
    while nanosleep(&left, &rest) != 0 && errno == EINTR { left = rest }
  }
}
