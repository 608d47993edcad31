// Issuance with the device registry against issuance without it, in one process: the same
// requests, the same CA key. Without: parse the request and sign the certificate. With: the
// same inside `DeviceRegistry.issue` — the one-time secret checked (PBKDF2-SHA256, 10 000
// rounds), the naming policy, and the certificate recorded in SQLite with an fsync'd commit.
// TLS and HTTP are left out: they cost the same either way.
import COpenSSL
import EdgeKeyCore
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation

func runRegistry(_ options: Options, ca testCA: TestCA, work: URL) throws {
  let count = max(options.devices * 20, 100)
  let ca = try CertificateAuthority(chainPEM: testCA.certificatePEM, keyPEM: TestCA.privateKeyPEM(testCA.key))
  var requests: [CertificateSigningRequest] = []
  for i in 0..<count {
    let key = try TestCA.generateKey()
    defer { EVP_PKEY_free(key) }
    let der = try ESTProbe.request(keyPEM: TestCA.privateKeyPEM(key), subject: [.init("CN", "device-\(i)")])
    requests.append(try CertificateSigningRequest(der: der))
  }
  let clock = ContinuousClock()
  let without = clock.measure {
    for csr in requests {
      guard let parsed = try? CertificateSigningRequest(der: csr.der) else { continue }
      _ = try? ca.issue(for: parsed, lifetime: .seconds(86400))
    }
  }
  let path = work.appendingPathComponent("bench-registry-\(UUID().uuidString).db").path
  let registry = try DeviceRegistry(path: path)
  try registry.importManifest(
    (0..<count).map {
      ManifestEntry(id: "SN-\($0)", names: ["device-\($0)"], credential: .secret("secret-of-device-\($0)-padding"))
    }, naming: NamingPolicy())
  var issued = 0
  let with = clock.measure {
    for (i, csr) in requests.enumerated() {
      guard let parsed = try? CertificateSigningRequest(der: csr.der),
        case .issued? = try? registry.issue(
          .secret(device: "SN-\(i)", secret: "secret-of-device-\(i)-padding"), csr: parsed, naming: NamingPolicy(),
          operation: "simpleenroll", source: "bench",
          sign: { _ throws(RAError) in try ca.issue(for: parsed, lifetime: .seconds(86400)) })
      else { continue }
      issued += 1
    }
  }
  // The same on the shared password: no PBKDF2, so what is left is the policy and the fsync.
  var shared = NamingPolicy()
  shared.sharedPasswordPattern = "*"
  let sharedRegistry = try DeviceRegistry(
    path: work.appendingPathComponent("bench-registry-shared-\(UUID().uuidString).db").path)
  var issuedShared = 0
  let withShared = clock.measure {
    for csr in requests {
      guard let parsed = try? CertificateSigningRequest(der: csr.der),
        case .issued? = try? sharedRegistry.issue(
          .sharedPassword(user: "line"), csr: parsed, naming: shared, operation: "simpleenroll", source: "bench",
          sign: { _ throws(RAError) in try ca.issue(for: parsed, lifetime: .seconds(86400)) })
      else { continue }
      issuedShared += 1
    }
  }
  let seconds = { (d: Duration) in Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18 }
  print(
    "registry: \(issued) of \(count) issued with the registry in \(seconds(with)) s; \(count) without in \(seconds(without)) s"
  )
  Report.shared.add(
    "issuances/s, in-process, with the registry (\(count), fsync'd)", ours: Double(issued) / seconds(with),
    anchorName: "without", anchor: Double(count) / seconds(without), unit: "/s", higherIsBetter: true)
  Report.shared.add(
    "issuances/s, with the registry, shared password (no PBKDF2)", ours: Double(issuedShared) / seconds(withShared),
    anchorName: "without", anchor: Double(count) / seconds(without), unit: "/s", higherIsBetter: true)
}
