import COpenSSL
import EdgeKeyCore
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation
import Testing

/// The example ACL, as the broker and the RA read it.
let exampleACL: String = {
  let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
  return (try? String(contentsOf: root.appendingPathComponent("Examples/broker/acl"), encoding: .utf8)) ?? ""
}()

/// The attack list of the registration authority's review, each case refused with its reason
/// and nothing issued (curl and OpenSSL-built requests: a client that is not ours).
@Suite("issuance policy: who may be issued which name")
struct IssuancePolicyTests {
  /// A registry row count, by `admin list`.
  func devices(_ ra: RegistrationAuthority) throws -> [String] {
    try ra.admin(["list"]).output.split(separator: "\n").map(String.init)
  }

  @Test(
    "the shared password: only behind its flag and pattern; reserved, held, malformed names refused, nothing issued")
  func sharedPasswordAttacks() throws {
    let ca = try TestCA()
    let acl = try ESTProbe.writeTemporary(exampleACL)
    let ra = try RegistrationAuthority(
      ca: ca, password: nil,
      extraArguments: [
        "--password", "device:factory-secret", "--allow-shared-password", "--name-pattern", "*", "--reserve-from-acl",
        acl,
      ])
    let probe = try ESTProbe(ra)
    let real = try probe.newKey()
    let enrolled = try probe.enroll(
      try probe.request(key: real, subject: [.init("CN", "device-0002")]), basic: "device:factory-secret")
    #expect(enrolled.status == 200, "\(enrolled.body)")
    let attacker = try probe.newKey()
    let cases: [(subject: [ESTProbe.Attribute], sans: String?, reason: String)] = [
      ([.init("CN", "telemetry-collector")], nil, "telemetry-collector is reserved"),
      ([.init("CN", "device-0002")], nil, "is held by device \"device-0002\""),
      ([.init("CN", "")], nil, "the name is empty"),
      ([.init("CN", "device-0001/telemetry")], nil, "contains /"),
      ([.init("CN", "device+")], nil, "contains +"),
      ([.init("CN", "device#")], nil, "contains #"),
      ([.init("CN", "device\nforged log line")], nil, "control character U+A"),
      ([.init("CN", "device\u{1B}[31m")], nil, "control character U+1B"),
      ([.init("CN", "$SYS")], nil, "starts with $"),
      ([.init("CN", " device")], nil, "starts or ends with a space"),
      ([.init("CN", String(repeating: "d", count: 65))], nil, "longer than 64"),
      ([.init("CN", "device-0009\u{202E}")], nil, "invisible character U+202E"),
      // (OpenSSL will not encode a UTF8String that is not UTF-8; a BMPString is refused by type.)
      (
        [.init("CN", bytes: [0x00, 0x64, 0x00, 0x65], type: V_ASN1_BMPSTRING)], nil,
        "not valid UTF8String or PrintableString"
      ),
      ([.init("CN", "device-0010", type: V_ASN1_T61STRING)], nil, "not valid UTF8String or PrintableString"),
      ([], nil, "no common name"),
      ([.init("CN", "a"), .init("CN", "b")], nil, "more than one CN"),
      ([.init("CN", "device-0011"), .init("UID", "root")], nil, "attribute UID is not allowed"),
      ([.init("CN", "device-0012")], "DNS:*.fleet.local", "subject alternative names are not allowed"),
      ([.init("CN", "device-0013")], "IP:127.0.0.1", "subject alternative names are not allowed"),
    ]
    for c in cases {
      let answer = try probe.enroll(
        try probe.request(key: attacker, subject: c.subject, sans: c.sans), basic: "device:factory-secret")
      #expect(answer.status == 403 || answer.status == 400, "\(c.subject.map(\.field)): \(answer.status)")
      #expect(answer.body.contains(c.reason), "\(c.reason) — got: \(answer.body)")
      #expect(answer.certificatePEM == nil)
    }
    #expect(ra.issuanceLog.count == 1, "only the real device-0002 was issued")
    #expect(try devices(ra).count == 1)
    #expect(try ra.admin(["audit"]).output.components(separatedBy: "\trefused\t").count - 1 >= cases.count - 4)

    // Without --allow-shared-password the RA does not start with a password.
    let log = ra.directory.appendingPathComponent("no-flag.log").path
    let refused = try ChildProcess(
      try builtExecutable("edgekey-ra"),
      ["--password", "device:x", "--registry", ra.directory.appendingPathComponent("other.db").path], logPath: log)
    #expect(refused.wait() == 2)
    #expect(try String(contentsOfFile: log, encoding: .utf8).contains("--allow-shared-password"))
  }

  @Test("a name pattern bounds the shared password, and the issued certificate carries only allowed SANs")
  func namePatternAndSANs() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(
      ca: ca, password: nil,
      extraArguments: [
        "--password", "line:pw", "--allow-shared-password", "--name-pattern", "device-*", "--allow-san",
        "DNS:{name}.fleet.local",
      ])
    let probe = try ESTProbe(ra)
    let key = try probe.newKey()
    let outside = try probe.enroll(try probe.request(key: key, subject: [.init("CN", "backend")]), basic: "line:pw")
    #expect(outside.status == 403)
    #expect(outside.body.contains("enrols names matching device-*"))
    let wildcard = try probe.enroll(
      try probe.request(key: key, subject: [.init("CN", "device-1")], sans: "DNS:*.fleet.local"), basic: "line:pw")
    #expect(wildcard.status == 403)
    #expect(wildcard.body.contains("DNS:*.fleet.local is not allowed (allowed: DNS:device-1.fleet.local)"))
    let other = try probe.enroll(
      try probe.request(key: key, subject: [.init("CN", "device-1")], sans: "DNS:device-2.fleet.local"),
      basic: "line:pw")
    #expect(other.status == 403)
    let good = try probe.enroll(
      try probe.request(
        key: key, subject: [.init("O", "Fleet"), .init("CN", "device-1")], sans: "DNS:device-1.fleet.local"),
      basic: "line:pw")
    #expect(good.status == 200, "\(good.body)")
    let issued = try Certificate(pem: try #require(good.certificatePEM))
    #expect(issued.subjectAlternativeNames == [.dns("device-1.fleet.local")])
    #expect(issued.subject == "CN=device-1,O=Fleet")
    #expect(ra.issuanceLog.count == 1)
  }

  @Test("one-time secrets: one device each, used once; the same key may ask again; a wrong one is 401 with a challenge")
  func oneTimeSecrets() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(ca: ca, password: nil)
    try ra.importManifest(
      text: "serial,name,secret\nSN-1,device-0001,secret-of-device-one-1\nSN-2,device-0002,secret-of-device-two-2\n")
    let probe = try ESTProbe(ra)
    let key = try probe.newKey()
    func enroll(_ name: String, _ basic: String, key: ESTProbe.Key) throws -> ESTProbe.Answer {
      try probe.enroll(try probe.request(key: key, subject: [.init("CN", name)]), basic: basic)
    }
    // A device's secret enrols its own name, not another's.
    let crossed = try enroll("device-0002", "SN-1:secret-of-device-one-1", key: key)
    #expect(crossed.status == 403)
    #expect(crossed.body.contains("enrols the name \"device-0001\", not \"device-0002\""))
    let wrong = try enroll("device-0001", "SN-1:guess-guess-guess-guess", key: key)
    #expect(wrong.status == 401)
    #expect(wrong.headers["www-authenticate"] == "Basic realm=\"EST\"")
    let unknown = try enroll("device-0001", "SN-9:secret-of-device-one-1", key: key)
    #expect(unknown.status == 401)
    let first = try enroll("device-0001", "SN-1:secret-of-device-one-1", key: key)
    #expect(first.status == 200, "\(first.body)")
    // The answer was lost: the same key asks again and gets a certificate.
    let again = try enroll("device-0001", "SN-1:secret-of-device-one-1", key: key)
    #expect(again.status == 200, "\(again.body)")
    // Someone else with the secret and a key of their own: refused.
    let thief = try enroll("device-0001", "SN-1:secret-of-device-one-1", key: try probe.newKey())
    #expect(thief.status == 403)
    #expect(thief.body.contains("one-time secret of device \"SN-1\" was used on"))
    #expect(ra.issuanceLog.count == 2)
    let listed = try devices(ra)
    #expect(listed.contains { $0.hasPrefix("SN-1\tactive\tsecret (used)\tdevice-0001\t2 valid of 2") }, "\(listed)")
    #expect(listed.contains { $0.hasPrefix("SN-2\tactive\tsecret (unused)") })
    // The secret itself is nowhere in the registry, the RA's log or admin's output.
    let database = try Data(contentsOf: URL(fileURLWithPath: ra.registryPath))
    #expect(database.range(of: Data("secret-of-device-one-1".utf8)) == nil)
    #expect(!(try ra.admin(["show", "SN-1"]).output.contains("secret-of-device")))
    #expect(!ra.log.contains("secret-of-device"))
    // A manifest that reuses a name, or names a reserved one, is refused whole.
    let clash = try ra.admin([
      "import", try ESTProbe.writeTemporary("serial,name,secret\nSN-3,device-0001,another-secret-000001\n"),
    ])
    #expect(clash.status != 0)
    #expect(clash.output.contains("held by device \"SN-1\""))
  }

  @Test("a bootstrap certificate enrols exactly its derived name, once; a second device's name never")
  func bootstrapCertificate() throws {
    let ca = try TestCA()
    let factory = try TestCA(name: "Factory CA")
    let ra = try RegistrationAuthority(
      ca: ca, password: nil, bootstrapCA: factory,
      extraArguments: ["--bootstrap-name", "device-{cn}", "--bootstrap-reenrol", "refuse"])
    let probe = try ESTProbe(ra)
    let bootstrap = try factory.issueSoftwareClient(commonName: "serial-ABC123")
    defer { EVP_PKEY_free(bootstrap.key) }
    let client = (
      chain: try probe.file(bootstrap.certificate + factory.certificatePEM),
      key: try probe.file(TestCA.privateKeyPEM(bootstrap.key))
    )
    let key = try probe.newKey()
    for name in ["telemetry-collector", "device-0002", "serial-ABC123", "device-serial-XYZ"] {
      let answer = try probe.enroll(
        try probe.request(key: key, subject: [.init("CN", name)]), clientCertificate: client)
      #expect(answer.status == 403, "\(name)")
      #expect(answer.body.contains("enrols the name \"device-serial-ABC123\""), "\(answer.body)")
    }
    let good = try probe.enroll(
      try probe.request(key: key, subject: [.init("CN", "device-serial-ABC123")]), clientCertificate: client)
    #expect(good.status == 200, "\(good.body)")
    let twice = try probe.enroll(
      try probe.request(key: try probe.newKey(), subject: [.init("CN", "device-serial-ABC123")]),
      clientCertificate: client)
    #expect(twice.status == 403)
    #expect(twice.body.contains("refused by policy"))
    #expect(ra.issuanceLog.count == 1)
  }

  @Test("rate limits: past the credential's budget a 429 with Retry-After, and nothing changes")
  func rateLimits() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(ca: ca, password: nil, extraArguments: ["--rate-per-credential", "3/1h"])
    try ra.importManifest(text: "serial,name,secret\nSN-1,device-0001,secret-of-device-one-1\n")
    let probe = try ESTProbe(ra)
    let key = try probe.newKey()
    var statuses: [Int] = []
    var retryAfter: String?
    for _ in 0..<4 {
      let a = try probe.enroll(
        try probe.request(key: key, subject: [.init("CN", "device-0001")]), basic: "SN-1:wrong-wrong-wrong-wrong")
      statuses.append(a.status)
      retryAfter = a.headers["retry-after"] ?? retryAfter
    }
    #expect(statuses == [401, 401, 401, 429])
    #expect(Int(retryAfter ?? "") ?? 0 > 1000, "an hour's budget refills one request in 20 minutes")
    // The real secret is refused too while the budget lasts: the limit is on the credential.
    let real = try probe.enroll(
      try probe.request(key: key, subject: [.init("CN", "device-0001")]), basic: "SN-1:secret-of-device-one-1")
    #expect(real.status == 429)
    #expect(ra.issuanceLog.isEmpty)
  }
}

extension ESTProbe {
  /// Writes `text` to a new temporary file; returns its path.
  static func writeTemporary(_ text: String) throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-\(UUID().uuidString)").path
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
  }
}
