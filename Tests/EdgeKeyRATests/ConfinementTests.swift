import COpenSSL
import EdgeKeyTestSupport
import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

@Suite("the example ACL and the naming policy together")
struct ConfinementTests {
  @Test("names from the RA stay inside the example ACL: a device reads and writes only its own subtree")
  func confined() throws {
    let ca = try TestCA()
    let aclFile = try ESTProbe.writeTemporary(exampleACL)
    let ra = try RegistrationAuthority(ca: ca, password: nil, extraArguments: ["--reserve-from-acl", aclFile])
    try ra.importManifest(
      text: "serial,name,secret\nSN-1,device-0001,secret-of-device-one-1\nSN-2,device-0002,secret-of-device-two-2\n")
    let probe = try ESTProbe(ra)
    func device(_ serial: String, _ name: String, _ secret: String) throws -> (cert: String, key: String) {
      let key = try probe.newKey()
      let answer = try probe.enroll(
        try probe.request(key: key, subject: [.init("CN", name)]), basic: "\(serial):\(secret)")
      return (try probe.file(try #require(answer.certificatePEM, "\(answer.body)")), key.file)
    }
    let one = try device("SN-1", "device-0001", "secret-of-device-one-1")
    let two = try device("SN-2", "device-0002", "secret-of-device-two-2")
    // The back end's identity comes from the CA directly, never from the RA (it is reserved).
    let collector = try ca.issueSoftwareClient(commonName: "telemetry-collector")
    let backend = (
      cert: try probe.file(collector.certificate), key: try probe.file(TestCA.privateKeyPEM(collector.key))
    )
    EVP_PKEY_free(collector.key)
    let server = try ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: ca.certificatePEM, aclFile: exampleACL)
    let caFile = try probe.file(ca.certificatePEM)
    func tls(_ who: (cert: String, key: String)) -> [String] {
      ["-h", "127.0.0.1", "-p", String(broker.port), "--cafile", caFile, "--cert", who.cert, "--key", who.key]
    }
    func subscribe(_ who: (cert: String, key: String), _ name: String) throws -> (ChildProcess, String) {
      let out = ra.directory.appendingPathComponent("\(name).out").path
      let p = try ChildProcess(
        "/usr/bin/mosquitto_sub", tls(who) + ["-t", "devices/#", "-v", "-q", "1", "-i", name], logPath: out)
      return (p, out)
    }
    let (backendSub, backendOut) = try subscribe(backend, "backend")
    let (deviceSub, deviceOut) = try subscribe(one, "device-0001")
    func publish(_ who: (cert: String, key: String), _ topic: String, _ message: String) throws {
      _ = try Command.runCapturing("mosquitto_pub", tls(who) + ["-t", topic, "-m", message, "-q", "1"])
    }
    func waitFor(_ text: String, in path: String) -> Bool {
      let deadline = Date().addingTimeInterval(30)
      while Date() < deadline {
        if let seen = try? String(contentsOfFile: path, encoding: .utf8), seen.contains(text) { return true }
        usleep(50_000)
      }
      return false
    }
    // Both subscribers are in place once each has seen a message of device-0001's subtree
    // (published again until then: a subscription's start is not announced).
    func seen(_ path: String) -> Bool {
      (try? String(contentsOfFile: path, encoding: .utf8))?.contains("devices/device-0001/t hello") == true
    }
    let deadline = Date().addingTimeInterval(30)
    while !(seen(deviceOut) && seen(backendOut)) && Date() < deadline {
      try publish(one, "devices/device-0001/t", "hello")
      usleep(100_000)
    }
    #expect(seen(deviceOut) && seen(backendOut), "both subscribers connected")
    try publish(one, "devices/device-0002/t", "forged")
    try publish(one, "devices/device-0001/t/../../device-0002", "dots")
    try publish(two, "devices/device-0002/t", "private")
    try publish(one, "devices/device-0001/t", "after")
    #expect(waitFor("devices/device-0001/t after", in: backendOut))
    #expect(waitFor("devices/device-0002/t private", in: backendOut), "the back end reads every device")
    let backendSaw = try String(contentsOfFile: backendOut, encoding: .utf8)
    let deviceSaw = try String(contentsOfFile: deviceOut, encoding: .utf8)
    #expect(!backendSaw.contains("forged"), "device-0001 cannot write under device-0002")
    #expect(!deviceSaw.contains("private"), "device-0001 cannot read device-0002's subtree: \(deviceSaw)")
    #expect(backendSaw.contains("dots"), "a topic with .. is just a longer topic in device-0001's own subtree")
    backendSub.stop()
    deviceSub.stop()
  }
}
