import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

@Suite("the registry under SIGKILL")
struct RegistryCrashTests {
  @Test(
    "100 concurrent enrolments while the RA is SIGKILLed at random points: no name twice, every certificate recorded")
  func killedDuringConcurrentEnrolments() async throws {
    // On a thread of its own: it blocks for long (see onOwnThread).
    try await onOwnThread {
      let ca = try TestCA()
      let ra = try RegistrationAuthority(
        ca: ca, password: nil,
        extraArguments: ["--password", "line:pw", "--allow-shared-password", "--name-pattern", "race-*"])
      // 50 devices with secrets of their own, and 50 requests racing on the shared password for
      // ten names, five different keys for each.
      var manifest = "serial,name,secret\n"
      for i in 0..<50 { manifest += "SN-\(i),device-\(i),secret-of-device-\(i)-padding\n" }
      try ra.importManifest(text: manifest)
      let probe = try ESTProbe(ra)
      struct Job {
        var name: String
        var basic: String
        var key: ESTProbe.Key
      }
      var list: [Job] = []
      for i in 0..<50 {
        list.append(Job(name: "device-\(i)", basic: "SN-\(i):secret-of-device-\(i)-padding", key: try probe.newKey()))
      }
      for i in 0..<50 { list.append(Job(name: "race-\(i % 10)", basic: "line:pw", key: try probe.newKey())) }
      let jobs = list.shuffled()

      final class Shared: @unchecked Sendable {
        let lock = NSLock()
        var handedOut: [(job: Int, pem: String)] = []
        var finalStatus: [Int: Int] = [:]
        var killing = true
        var kills = 0
      }
      let shared = Shared()
      let lock = shared.lock
      // The killer signals when it is done: the test then owns `ra` again (a semaphore is a
      // happens-before edge; polling Thread.isFinished is not one ThreadSanitizer can see).
      let killerDone = DispatchSemaphore(value: 0)
      let killer = Thread {
        defer { killerDone.signal() }
        while true {
          lock.lock()
          let go = shared.killing
          lock.unlock()
          // Eight kills at random moments; then the RA is left to finish what is left.
          if !go || shared.kills >= 8 { return }
          usleep(UInt32.random(in: 100_000...600_000))
          ra.kill()
          lock.lock()
          shared.kills += 1
          lock.unlock()
          try? ra.restart()
        }
      }
      killer.start()
      // One thread per device, all at once.
      let group = DispatchGroup()
      for index in jobs.indices {
        group.enter()
        Thread.detachNewThread {
          defer { group.leave() }
          enrol(index)
        }
      }
      group.wait()
      @Sendable func enrol(_ index: Int) {
        let job = jobs[index]
        // A client retries what the kill cut off (no answer, or a 5xx), and keeps the last answer.
        for _ in 0..<200 {
          guard let csr = try? probe.request(key: job.key, subject: [.init("CN", job.name)]),
            let answer = try? probe.enroll(csr, basic: job.basic), answer.status != 0, answer.status < 500
          else {
            usleep(UInt32.random(in: 50_000...150_000))
            continue
          }
          lock.lock()
          shared.finalStatus[index] = answer.status
          if let pem = answer.certificatePEM { shared.handedOut.append((index, pem)) }
          lock.unlock()
          // A device whose answer was a certificate is done; a 403 is final too.
          return
        }
      }
      lock.withLock { shared.killing = false }
      killerDone.wait()
      ra.kill()

      #expect(shared.finalStatus.count == jobs.count, "every request got an answer")
      #expect(shared.kills >= 3, "the RA was killed while the enrolments ran")
      let registry = try DeviceRegistry(path: ra.registryPath)
      var keysByName: [String: Set<String>] = [:]
      for (index, pem) in shared.handedOut {
        let certificate = try Certificate(pem: pem)
        let record = try registry.certificate(serial: certificate.serialNumber)
        #expect(record != nil, "certificate \(certificate.serialNumber) for \(jobs[index].name) is in the registry")
        #expect(certificate.commonName == jobs[index].name)
        keysByName[jobs[index].name, default: []].insert(Certificate.sha256Hex(certificate.publicKeyDER))
      }
      for (name, keys) in keysByName { #expect(keys.count == 1, "\(name) was issued to \(keys.count) keys") }
      // All 50 secret devices enrolled; each raced name went to exactly one key.
      #expect((0..<50).allSatisfy { keysByName["device-\($0)"] != nil })
      #expect((0..<10).allSatisfy { keysByName["race-\($0)"]?.count == 1 })
      let devices = try registry.devices()
      let names = devices.flatMap(\.names)
      #expect(Set(names).count == names.count)
      #expect(names.count == 60)
    }
  }
}
