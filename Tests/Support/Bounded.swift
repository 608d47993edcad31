import CEdgeKeyTestHelpers
import EdgeKeyCore
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// Runs `body` on a thread of its own and waits at most `limit` for it: a call that hangs
/// fails the test instead of hanging the suite (the limit is far above the bound under test).
public func returnsWithin<T: Sendable>(
  _ limit: Duration, _ body: @escaping @Sendable () throws -> T
) throws -> T {
  let box = ResultBox<T>()
  let done = DispatchSemaphore(value: 0)
  Thread.detachNewThread {
    box.result = Result { try body() }
    done.signal()
  }
  let seconds = Double(limit.components.seconds)
  guard done.wait(timeout: .now() + seconds) == .success, let result = box.result else {
    throw HarnessError("still blocked after \(limit)")
  }
  return try result.get()
}

public final class ResultBox<T>: @unchecked Sendable {
  // @unchecked: written by one thread before the semaphore is signalled, read after.
  public var result: Result<T, any Error>?
  public init() {}
}

/// Log events kept in memory, for tests that wait for something a component logs.
public final class RecordingLogHandler: LogHandler, @unchecked Sendable {
  // @unchecked: `events` is guarded by `lock`.
  private let lock = NSLock()
  private var events: [String] = []
  public init() {}
  public func log(event: Logger.Event) {
    lock.lock()
    events.append(event.message)
    lock.unlock()
  }
  public var messages: [String] {
    lock.lock()
    defer { lock.unlock() }
    return events
  }
}

/// A TCP server that accepts connections and never answers (a server hung mid-request): what a
/// client's transfer timeout or cancellation must cope with.
public final class SilentServer: @unchecked Sendable {
  public let port: UInt16
  private let listener: Int32

  public init() throws {
    (listener, port) = try PortFinder.listeningSocket()
  }

  deinit { close(listener) }
}
