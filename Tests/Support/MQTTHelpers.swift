import EdgeKeyMQTT
import Foundation

/// A reconnect policy for tests: quick, still jittered.
public let quickReconnect = ReconnectPolicy(
  initialDelay: 0.05, maximumDelay: 0.5, stableAfter: 1, refusedInitialDelay: 300, refusedMaximumDelay: 600)

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
