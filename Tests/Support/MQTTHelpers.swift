import EdgeKeyMQTT
import Foundation

/// A reconnect policy for tests: quick, still jittered.
public let quickReconnect = ReconnectPolicy(
  initialDelay: .milliseconds(50), maximumDelay: .milliseconds(500), stableAfter: .seconds(1),
  refusedInitialDelay: .seconds(300), refusedMaximumDelay: .seconds(600))

public func temporaryPath(_ name: String) -> String {
  FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-\(UUID().uuidString)").appendingPathComponent(
    name
  ).path
}

/// Reads a client's messages into a set of payloads (and counts duplicates) until `expected`
/// are all there or `seconds` pass.
public func drain(_ client: MQTTClient, expecting expected: Set<String>, within seconds: Double) async -> (
  got: Set<String>, duplicates: Int
) {
  let task = Task {
    var got = Set<String>()
    var duplicates = 0
    for await message in client.messages {
      if !got.insert(String(decoding: message.payload, as: UTF8.self)).inserted { duplicates += 1 }
      if expected.isSubset(of: got) { break }
    }
    return (got, duplicates)
  }
  let timer = Task {
    try await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
    task.cancel()
  }
  let result = await task.value
  timer.cancel()
  return result
}

/// Busy threads that keep every core loaded, for tests that must pass on a loaded machine.
public final class CPULoad: @unchecked Sendable {
  // @unchecked: `running` is only read by the spinning threads and written once by stop().
  private let running = ManagedAtomicFlag()

  public init(threads: Int) {
    for _ in 0..<threads {
      let flag = running
      Thread.detachNewThread {
        var x: UInt64 = 1
        while flag.isSet { x = x &* 6_364_136_223_846_793_005 &+ 1 }
        _ = x
      }
    }
  }

  public func stop() { running.clear() }
}

/// A flag the load threads poll, behind a lock (TSan sees it).
final class ManagedAtomicFlag: @unchecked Sendable {
  private let lock = NSLock()
  private var value = true
  var isSet: Bool {
    lock.lock()
    defer { lock.unlock() }
    return value
  }
  func clear() {
    lock.lock()
    value = false
    lock.unlock()
  }
}
