import EdgeKeyRA
import Foundation
import Testing

@Suite("naming policy and factory manifests, without a server")
struct NamingPolicyTests {
  @Test("globs: * any run, ? one character, everything else itself")
  func globs() {
    #expect(NamingPolicy.matches("device-0001", pattern: "device-*"))
    #expect(NamingPolicy.matches("device-", pattern: "device-*"))
    #expect(!NamingPolicy.matches("backend", pattern: "device-*"))
    #expect(NamingPolicy.matches("a1b", pattern: "a?b"))
    #expect(!NamingPolicy.matches("ab", pattern: "a?b"))
    #expect(NamingPolicy.matches("telemetry-collector", pattern: "*collector"))
    #expect(NamingPolicy.matches("x", pattern: "*"))
    #expect(!NamingPolicy.matches("device-1/t", pattern: "device-?"))
    #expect(NamingPolicy.matches("aXbXc", pattern: "a*b*c"))
    #expect(!NamingPolicy.matches("aXbXd", pattern: "a*b*c"))
  }

  @Test("names that could escape an ACL or forge a log line are refused, with the reason")
  func names() {
    var policy = NamingPolicy()
    policy.reserved = ["telemetry-collector", "ops-*"]
    #expect(policy.problem(with: "device-0001") == nil)
    #expect(policy.problem(with: "Gerät-7") == nil, "UTF-8 names are names")
    let refused: [(String, String)] = [
      ("", "empty"), ("a/b", "/"), ("a+b", "+"), ("a#b", "#"), ("$SYS", "$"), ("a\u{0}b", "U+0"),
      ("a\u{7F}", "U+7F"), ("a\u{85}", "U+85"), ("a\u{200B}b", "U+200B"), ("a\u{2028}b", "U+2028"),
      ("telemetry-collector", "reserved"), ("ops-1", "reserved (ops-*)"), (String(repeating: "x", count: 65), "64"),
      ("x ", "space"),
    ]
    for (name, reason) in refused {
      let why = policy.problem(with: name)
      #expect(why?.contains(reason) == true, "\(name.debugDescription): \(why ?? "accepted")")
    }
  }

  @Test("the user names of a mosquitto ACL are what --reserve-from-acl reserves")
  func aclUsers() {
    let acl = "# c\npattern readwrite devices/%u/#\n\nuser telemetry-collector\ntopic read devices/#\n  user  ops \n"
    #expect(NamingPolicy.aclUsers(acl) == ["telemetry-collector", "ops"])
  }

  @Test("manifests: CSV with a header or JSON lines; a malformed line is named and nothing is taken")
  func manifests() throws {
    let csv = try ManifestEntry.parse(Array("serial,name,secret\r\nSN-1, device-1 ,s3cret-s3cret-s3cret\n\n# c\n".utf8))
    #expect(
      csv == [ManifestEntry(id: "SN-1", names: ["device-1"], credential: .secret("s3cret-s3cret-s3cret"), line: 2)])
    let fingerprint = String(repeating: "ab", count: 32)
    let json = try ManifestEntry.parse(
      Array(
        "{\"serial\":\"SN-2\",\"names\":[\"a\",\"b\"],\"bootstrapFingerprint\":\"SHA256:\(fingerprint.uppercased())\"}\n"
          .utf8))
    #expect(json.first?.names == ["a", "b"])
    #expect(json.first?.credential == .bootstrapFingerprint(fingerprint))
    let failures: [(String, String)] = [
      ("name,secret\nx,y\n", "header naming serial and name"),
      ("serial,name,secret,bootstrap_fingerprint\n", "one of secret or bootstrap_fingerprint"),
      ("serial,name,secret\nSN-1,device-1\n", "line 2: 2 fields"),
      ("serial,name,bootstrap_fingerprint\nSN-1,d,abc\n", "64 hex digits"),
      ("{\"serial\":\"SN-1\"}\n", "no \"name\""),
      ("{\"serial\":\"SN-1\",\"name\":\"d\"}\n", "no \"secret\""),
      ("{not json}\n", "not a JSON object"),
    ]
    for (text, reason) in failures {
      #expect {
        try ManifestEntry.parse(Array(text.utf8))
      } throws: { ($0 as? RegistryError)?.message.contains(reason) == true }
    }
    #expect(throws: RegistryError.self) { try ManifestEntry.parse([0x73, 0xFF, 0x0A]) }
  }

  @Test("an import is all or none: a bad line leaves the registry as it was")
  func importAllOrNone() throws {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-\(UUID().uuidString).db").path
    let registry = try DeviceRegistry(path: path)
    let entries = [
      ManifestEntry(id: "SN-1", names: ["device-1"], credential: .secret("secret-secret-secret"), line: 2),
      ManifestEntry(id: "SN-2", names: ["device-1"], credential: .secret("secret-secret-secret"), line: 3),
    ]
    #expect {
      try registry.importManifest(entries, naming: NamingPolicy())
    } throws: { ($0 as? RegistryError)?.message.contains("line 3") == true }
    #expect(try registry.devices().isEmpty)
    let short = [ManifestEntry(id: "SN-3", names: ["device-3"], credential: .secret("short"), line: 2)]
    #expect(throws: RegistryError.self) { try registry.importManifest(short, naming: NamingPolicy()) }
    try registry.importManifest([entries[0]], naming: NamingPolicy())
    #expect(try registry.devices().map(\.id) == ["SN-1"])
    #expect(throws: RegistryError.self) { try registry.reserve(["device-*"]) }
  }
}
