import EdgeKeyCore
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation
import Testing

#if canImport(Glibc)
  import Glibc
#endif

@Suite("revocation: the RA's CRL, read by mosquitto and OpenSSL")
struct RevocationTests {
  /// mosquitto_pub as device `key`/`certificate`: its exit status and what it printed.
  func publish(
    _ broker: MosquittoBroker, _ probe: ESTProbe, certificate: String, key: ESTProbe.Key, topic: String,
    caFile: String
  ) throws -> (status: Int32, output: String) {
    let result = try Command.runCapturing(
      "mosquitto_pub",
      [
        "-h", "127.0.0.1", "-p", String(broker.port), "--cafile", caFile, "--cert", try probe.file(certificate),
        "--key", key.file, "-t", topic, "-m", "x", "-q", "1",
      ])
    return (result.status, result.stdout + result.stderr)
  }

  /// Waits (bounded) until the RA's CRL file lists `serial`; returns the file's PEM.
  func crlListing(_ serial: String, at path: String) throws -> String {
    let deadline = Date().addingTimeInterval(30)
    while Date() < deadline {
      if let pem = try? String(contentsOfFile: path, encoding: .utf8),
        let text = try? Command.run("openssl", ["crl", "-noout", "-text"], input: Data(pem.utf8)),
        text.contains(serial)
      {
        return pem
      }
      usleep(50_000)
    }
    throw HarnessError("the CRL never listed \(serial)")
  }

  @Test(
    "a revoked device: the broker refuses it once it reads the CRL, it cannot re-enrol, and a fresh device still can")
  func revokedDeviceIsShutOut() throws {
    let ca = try TestCA()
    let crlPath = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-crl-\(UUID().uuidString).pem")
      .path
    let ra = try RegistrationAuthority(ca: ca, password: nil, extraArguments: ["--crl-out", crlPath])
    try ra.importManifest(
      text: """
        serial,name,secret
        SN-A,device-000a,secret-of-device-a-000
        SN-B,device-000b,secret-of-device-b-000
        SN-C,device-000c,secret-of-device-c-000

        """)
    let probe = try ESTProbe(ra)
    let caFile = try probe.file(ca.certificatePEM)
    func enroll(_ serial: String, _ name: String, _ key: ESTProbe.Key) throws -> String {
      let secret = "secret-of-device-\(serial.suffix(1).lowercased())-000"
      let answer = try probe.enroll(
        try probe.request(key: key, subject: [.init("CN", name)]), basic: "\(serial):\(secret)")
      guard let pem = answer.certificatePEM else { throw HarnessError("\(serial): \(answer.status) \(answer.body)") }
      return pem
    }
    let keyA = try probe.newKey()
    let keyB = try probe.newKey()
    let a = try Certificate(pem: try enroll("SN-A", "device-000a", keyA))
    let b = try Certificate(pem: try enroll("SN-B", "device-000b", keyB))
    let acl = exampleACL
    let server = try ca.issueServer()
    let before = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: ca.certificatePEM,
      crlPEM: try String(contentsOfFile: crlPath, encoding: .utf8), aclFile: acl)
    #expect(
      try publish(before, probe, certificate: a.pem, key: keyA, topic: "devices/device-000a/t", caFile: caFile).status
        == 0)
    before.stop()

    let revoked = try ra.admin(["revoke", "SN-A", "--reason", "keyCompromise"])
    #expect(revoked.status == 0, "\(revoked.output)")
    let pem = try crlListing(a.serialNumber, at: crlPath)
    #expect(!pem.contains(b.serialNumber))
    // OpenSSL, reading the CRL the RA wrote, agrees: A revoked, B not.
    let aFile = try probe.file(a.pem)
    let crlFile = try probe.file(pem)
    let verifyA = try Command.runCapturing(
      "openssl", ["verify", "-crl_check", "-CRLfile", crlFile, "-CAfile", caFile, aFile])
    #expect(verifyA.status != 0)
    #expect((verifyA.stdout + verifyA.stderr).contains("certificate revoked"))
    let verifyB = try Command.runCapturing(
      "openssl", ["verify", "-crl_check", "-CRLfile", crlFile, "-CAfile", caFile, try probe.file(b.pem)])
    #expect(verifyB.status == 0, "\(verifyB.stdout)\(verifyB.stderr)")
    // The same CRL over HTTPS, DER, signed by the CA.
    let der = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-\(UUID().uuidString).crl").path
    let fetched = try Command.runCapturing("curl", ["-s", "-o", der, "--cacert", caFile, ra.localhostURL + "/crl"])
    #expect(fetched.status == 0)
    let signed = try Command.runCapturing(
      "openssl", ["crl", "-inform", "DER", "-in", der, "-CAfile", caFile, "-noout", "-text"])
    #expect(signed.stderr.contains("verify OK") || signed.stdout.contains("verify OK"), "\(signed.stderr)")
    #expect(signed.stdout.contains("Key Compromise"))

    // mosquitto reads its crlfile when it starts: restarted, it refuses A and serves B.
    let after = try MosquittoBroker(
      certificatePEM: server.certificate, keyPEM: server.key, clientCAPEM: ca.certificatePEM, crlPEM: pem, aclFile: acl)
    let refusedA = try publish(
      after, probe, certificate: a.pem, key: keyA, topic: "devices/device-000a/t", caFile: caFile)
    #expect(refusedA.status != 0, "\(refusedA.output)")
    #expect(
      try publish(after, probe, certificate: b.pem, key: keyB, topic: "devices/device-000b/t", caFile: caFile).status
        == 0)

    // A cannot re-enrol with its revoked certificate, nor with its used secret and a new key.
    let renewal = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-000a")]),
      clientCertificate: (chain: aFile, key: keyA.file), renewal: true)
    #expect(renewal.status == 403)
    #expect(renewal.body.contains("was revoked on"), "\(renewal.body)")
    let again = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-000a")]),
      basic: "SN-A:secret-of-device-a-000")
    #expect(again.status == 403)
    #expect(again.body.contains("is revoked") || again.body.contains("was used"), "\(again.body)")
    // A fresh device still enrols, and B renews.
    #expect(try Certificate(pem: try enroll("SN-C", "device-000c", try probe.newKey())).commonName == "device-000c")
    let renewB = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-000b")]),
      clientCertificate: (chain: try probe.file(b.pem), key: keyB.file), renewal: true)
    #expect(renewB.status == 200, "\(renewB.body)")
  }
}
