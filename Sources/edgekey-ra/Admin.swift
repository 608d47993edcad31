import EdgeKeyCore
import EdgeKeyRA
import Foundation

let adminUsage = """
  usage: edgekey-ra admin --registry PATH COMMAND [ARGS]

  Manages the device registry (it may run while the RA serves; both use the same file).

    import FILE            add the devices of a factory manifest, all or none: JSON lines
                           {"serial":..,"name":..,"secret":..} (or "bootstrapFingerprint",
                           "bootstrapCertificate"), or CSV with a header: serial,name,secret
                           (or serial,name,bootstrap_fingerprint)
    list                   one line per device: id, state, how it enrols, names, certificates
    show ID                a device, its certificates and its audit trail
    revoke ID [--reason R] revoke a device: it may not enrol or renew again; its certificates
                           are listed in the next CRL
    revoke --serial HEX [--reason R]
                           revoke one certificate (R: unspecified, keyCompromise,
                           affiliationChanged, superseded, cessationOfOperation)
    revoke --serial HEX --external [--reason R]
                           revoke a certificate of the CA that the RA did not issue (a broker's
                           server certificate): it stays on every CRL
    retire ID              take a device out of service: certificates revoked, names released
    rearm ID --secret-file FILE
                           a new one-time secret for a device whose TPM was cleared or replaced;
                           when it enrols a new key, its old certificates are revoked
    require-attestation ID every key of this device must be attested from now on
    forget-tpm ID          forget the TPM a device attested with (its TPM was replaced); its
                           next activation binds the new one
    reserve NAME...        names or patterns (* and ?) never issued to a device
    audit [ID] [--limit N] the audit trail, oldest first

  Secrets are never printed; the manifest file is read, not passed as arguments.
  """

func runAdmin(_ arguments: [String]) -> Never {
  let parsed = parseArguments(arguments, flags: ["--external"], usage: adminUsage, positional: true)
  let known: Set<String> = ["--registry", "--reason", "--serial", "--limit", "--secret-file"]
  if let unknown = parsed.options.keys.first(where: { !known.contains($0) }) {
    fail("unknown admin option \(unknown)\n\(adminUsage)")
  }
  let registryPath = parsed.options["--registry"]?.last
  var options = parsed.options.compactMapValues(\.last)
  if parsed.flags.contains("--external") { options["--external"] = "yes" }
  let positional = parsed.positional
  guard let registryPath else { fail("admin needs --registry PATH\n\(adminUsage)") }
  guard let command = positional.first else { fail(adminUsage) }
  let args = Array(positional.dropFirst())
  do {
    let registry = try DeviceRegistry(path: registryPath)
    switch command {
    case "import":
      guard args.count == 1 else { fail("import takes one FILE") }
      guard let data = FileManager.default.contents(atPath: args[0]) else { fail("cannot read \(args[0])") }
      let entries = try ManifestEntry.parse([UInt8](data))
      let added = try registry.importManifest(entries, naming: NamingPolicy(), source: "admin import \(args[0])")
      print("imported \(added.count) device(s)")
    case "list":
      for d in try registry.devices() {
        let certificates = try registry.certificates(of: d.id)
        let valid = certificates.filter { $0.revoked == nil && $0.notAfter > Date() }.count
        var line = "\(d.id)\t\(d.state.rawValue)\t\(d.method.rawValue)"
        if d.method == .oneTimeSecret { line += d.secretUsed == nil ? " (unused)" : " (used)" }
        line += "\t\(d.names.joined(separator: ","))\t\(valid) valid of \(certificates.count) certificate(s)"
        print(line)
      }
    case "show":
      guard args.count == 1 else { fail("show takes one device ID") }
      guard let d = try registry.device(args[0]) else { fail("no device \(JSON.string(args[0]))") }
      print("device \(d.id): \(d.state.rawValue), enrols with \(d.method.rawValue)")
      print("  names: \(d.names.joined(separator: ", "))")
      if let f = d.bootstrapFingerprint { print("  bootstrap certificate SHA-256 \(f)") }
      if d.method == .oneTimeSecret {
        print("  one-time secret: \(d.secretUsed.map { "used \(Timestamp.iso8601($0))" } ?? "not used yet")")
      }
      if let a = try registry.attestation(of: d.id) {
        print(
          "  TPM: EK SHA-256 \(a.endorsementKeyFingerprint) (\(a.endorsementKeyIssuer)); AK certificate \(a.attestationKeyCertificateSerial), activated \(Timestamp.iso8601(a.activated))"
        )
      }
      for c in try registry.certificates(of: d.id) {
        let state =
          c.revoked.map { "revoked \(Timestamp.iso8601($0)) (\(c.reason?.rawValue ?? "unspecified"))" }
          ?? (c.notAfter > Date() ? "valid" : "expired")
        print("  certificate \(c.serial) \(c.subject) until \(Timestamp.iso8601(c.notAfter)): \(state)")
      }
      for e in try registry.audit(device: d.id, limit: 50) {
        print("  \(Timestamp.iso8601(e.time)) \(e.event): \(e.detail) [\(e.source)]")
      }
    case "revoke":
      let reason =
        try options["--reason"].map { text throws(RegistryError) in
          guard let r = RevocationReason(rawValue: text) else {
            throw RegistryError(
              .invalid, "--reason: one of \(RevocationReason.allCases.map(\.rawValue).joined(separator: ", "))")
          }
          return r
        } ?? .unspecified
      if let serial = options["--serial"] {
        guard args.isEmpty else { fail("revoke takes a device ID or --serial, not both") }
        if options["--external"] != nil {
          try registry.revokeExternal(serial: serial, reason: reason)
          print("revoked external certificate \(serial.uppercased())")
          exit(0)
        }
        let changed = try registry.revoke(serial: serial, reason: reason)
        print(
          changed
            ? "revoked certificate \(serial.uppercased())" : "certificate \(serial.uppercased()) was already revoked")
      } else {
        guard args.count == 1 else { fail("revoke takes one device ID (or --serial HEX)") }
        let serials = try registry.revokeDevice(args[0], reason: reason)
        print("revoked device \(args[0]) and \(serials.count) certificate(s)")
      }
    case "retire":
      guard args.count == 1 else { fail("retire takes one device ID") }
      let serials = try registry.retire(args[0])
      print("retired device \(args[0]); \(serials.count) certificate(s) revoked; its names are free")
    case "rearm":
      guard args.count == 1, let file = options["--secret-file"] else { fail("rearm takes ID --secret-file FILE") }
      guard let data = FileManager.default.contents(atPath: file) else { fail("cannot read \(file)") }
      let secret = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
      try registry.rearm(args[0], secret: secret)
      print("device \(args[0]) has a new one-time secret")
    case "require-attestation":
      guard args.count == 1 else { fail("require-attestation takes one device ID") }
      try registry.requireAttestation(of: args[0])
      print("device \(args[0]) must attest its keys")
    case "forget-tpm":
      guard args.count == 1 else { fail("forget-tpm takes one device ID") }
      try registry.forgetTPM(of: args[0])
      print("device \(args[0]): its TPM is forgotten; the next activation binds a new one")
    case "reserve":
      guard !args.isEmpty else { fail("reserve takes names or patterns") }
      try registry.reserve(args)
      print("reserved \(args.joined(separator: ", "))")
    case "audit":
      let limit = Int(options["--limit"] ?? "100") ?? 100
      for e in try registry.audit(device: args.first, limit: limit) {
        print("\(Timestamp.iso8601(e.time))\t\(e.device ?? "-")\t\(e.event)\t\(e.detail)\t\(e.source)")
      }
    default:
      fail("unknown admin command \(command)\n\(adminUsage)")
    }
  } catch {
    fail("\(error)")
  }
  exit(0)
}
