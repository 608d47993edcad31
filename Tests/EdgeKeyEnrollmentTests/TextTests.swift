import EdgeKeyCore
import Foundation
import Testing

@Suite("the Foundation-free helpers of EdgeKeyCore: text, locks, condition waits, threads")
struct TextTests {
  @Test("Text.fixed prints as printf's %.Nf, except at a decimal tie (half away from zero, not half even)")
  func fixed() {
    #expect(Text.fixed(0) == "0")
    #expect(Text.fixed(-0.4) == "0")
    #expect(Text.fixed(2.5) == "3")
    #expect(Text.fixed(-2.5) == "-3")
    #expect(Text.fixed(59.96, 1) == "60.0")
    #expect(Text.fixed(0.05, 1) == "0.1")
    #expect(Text.fixed(1_234_567.891, 2) == "1234567.89")
    #expect(Text.fixed(.infinity) == "inf")
    #expect(Text.fixed(-.infinity) == "-inf")
    #expect(Text.fixed(.nan) == "nan")
    var generator = SystemRandomNumberGenerator()
    var ties = 0
    for _ in 0..<20_000 {
      let value = Double.random(in: -1e7...1e7, using: &generator) / Double([1, 10, 1000].randomElement()!)
      let digits = Int.random(in: 0...3, using: &generator)
      let ours = Text.fixed(value, digits)
      let printf = String(format: "%.\(digits)f", value)
      if ours != printf && printf != "-" + ours {
        // Only at a tie after scaling may the two round differently.
        let scaled = abs(value) * pow(10, Double(digits))
        #expect(abs(scaled - scaled.rounded(.down) - 0.5) < 1e-6, "\(value) with \(digits): \(ours) vs \(printf)")
        ties += 1
      }
    }
    #expect(ties < 20)
  }

  @Test("hex, trimming and padding")
  func text() {
    let bytes: [UInt8] = Array(0...255)
    #expect(Text.hex(bytes) == bytes.map { String(format: "%02x", $0) }.joined())
    #expect(Text.hex([]) == "")
    #expect(" \t a b \t".trimmingSpaces() == "a b")
    #expect(" \t ".trimmingSpaces() == "")
    #expect("\r\n x \n".trimmingSpaces() == "\r\n x \n")
    #expect("\r\n x y\n\t".trimmingWhitespace() == "x y")
    #expect("\n\r\n".trimmingWhitespace() == "")
    #expect("tls".padded(to: 6) == "tls   ")
    #expect("certificate".padded(to: 4) == "cert")
  }

  @Test("Condition: a timed wait runs out, a signal ends it early; Threads.detach runs named threads")
  func conditionAndThreads() {
    let condition = Condition()
    condition.lock()
    let start = Date()
    #expect(condition.wait(seconds: 0.05) == false)
    #expect(Date().timeIntervalSince(start) >= 0.04)
    condition.unlock()

    final class Box: @unchecked Sendable {
      var name = ""
      var done = false
    }
    let box = Box()
    Threads.detach(name: "edgekey-test-thread-name") {
      Threads.sleep(0.02)
      let comm = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? ""
      condition.lock()
      box.name = comm.trimmingWhitespace()
      box.done = true
      condition.broadcast()
      condition.unlock()
    }
    condition.lock()
    var signaled = true
    while !box.done && signaled { signaled = condition.wait(seconds: 10) }
    condition.unlock()
    #expect(box.done)
    #expect(box.name == "edgekey-test-th", "the kernel keeps 15 bytes of a thread's name")

    let lock = Lock()
    final class Counter: @unchecked Sendable { var total = 0 }
    let counter = Counter()
    DispatchQueue.concurrentPerform(iterations: 8) { _ in
      for _ in 0..<1000 { lock.withLock { counter.total += 1 } }
    }
    #expect(counter.total == 8000)
  }

  @Test("a Duration as seconds and as the text messages use: whole seconds without a fraction")
  func durationSeconds() {
    #expect(Duration.seconds(15).seconds == 15)
    #expect(Duration.milliseconds(250).seconds == 0.25)
    #expect(Duration.seconds(15).secondsText == "15 s")
    #expect(Duration.milliseconds(250).secondsText == "0.25 s")
    #expect(Duration.milliseconds(-1500).secondsText == "-1.5 s")
  }
}
