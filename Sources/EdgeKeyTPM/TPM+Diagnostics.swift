internal import CEdgeKeyProvider
internal import CTSS2

/// What a TPM is and what it can do: for `edgekey tpm info`, provisioning checks and support.
public struct TPMInfo: Sendable, Equatable {
  /// Four-letter TCG vendor ID, e.g. "IFX" (Infineon), "STM ", "NTC", "IBM" (swtpm).
  public var manufacturer: String
  /// The vendor's model string.
  public var vendor: String
  /// Firmware version as the vendor numbers it ("7.85.4555.0").
  public var firmwareVersion: String
  /// TPM 2.0 specification revision, e.g. "1.64".
  public var specRevision: String
  /// Algorithms the TPM implements, by TCG name ("rsa", "ecc", "sha384", "aes", ...).
  public var algorithms: [String]
  /// ECC curves it implements ("nist_p256", "nist_p384", ...). An SLB9670 has no P-384.
  public var curves: [String]
  /// The device key kinds this TPM can create (checked with TPM2_TestParms).
  public var supportedKeys: [KeyAlgorithm]
  /// True while the TPM refuses DA-protected authorizations.
  public var inLockout: Bool
  /// Failed authorizations counted so far, and the count that triggers lockout.
  public var lockoutCounter: UInt32
  /// Failures that trigger lockout.
  public var maxAuthFail: UInt32
  /// How long until one failure is forgotten (TPM2_PT_LOCKOUT_INTERVAL).
  public var lockoutInterval: Duration
  /// Transient object slots the TPM guarantees (3 on swtpm).
  public var transientSlots: UInt32
  /// Objects persisted in NV memory.
  public var persistentHandles: [PersistentHandle]
  /// NV indices holding endorsement key certificates (TCG: 0x01c00002 RSA 2048, 0x01c0000a ECC
  /// P-256, 0x01c00012 and up for other keys); empty on a TPM shipped without them (swtpm
  /// unless `swtpm_setup --create-ek-cert`).
  public var endorsementCertificates: [UInt32]
  /// The TCTI in use, and whether a resource manager sits in between.
  public var tcti: String
  /// Whether a resource manager (tpm2-abrmd, /dev/tpmrm0) sits between us and the TPM.
  public var hasResourceManager: Bool
}

private let TPM2_PT_FIXED: UInt32 = 0x100
private let TPM2_PT_VAR: UInt32 = 0x200

extension TPM {
  /// Reads the TPM's identity and capabilities. A few TPM2_GetCapability and TPM2_TestParms.
  public func info() throws(TPMError) -> TPMInfo {
    try withESYS { ctx throws(TPMError) -> TPMInfo in
      let fixed = try properties(ctx, from: TPM2_PT_FIXED, count: 0x50)
      let variable = try properties(ctx, from: TPM2_PT_VAR, count: 0x20)
      func text(_ values: [UInt32?]) -> String {
        let bytes = values.compactMap { $0 }.flatMap { v in
          [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)]
        }
        return String(decoding: bytes.filter { $0 != 0 }, as: UTF8.self).trimmingSpaces()
      }
      let fw1 = fixed[TPM2_PT_FIXED + 11] ?? 0
      let fw2 = fixed[TPM2_PT_FIXED + 12] ?? 0
      let revision = fixed[TPM2_PT_FIXED + 2] ?? 0
      let algorithms = try capabilityList(ctx, capability: TPM2_CAP_ALGS, from: 0, count: 128) { data in
        let list = data.algorithms
        return withUnsafeBytes(of: list.algProperties) { raw in
          raw.bindMemory(to: TPMS_ALG_PROPERTY.self).prefix(Int(list.count)).map { UInt32($0.alg) }
        }
      }.map(algorithmName)
      let curves = try capabilityList(ctx, capability: TPM2_CAP_ECC_CURVES, from: 0, count: 64) { data in
        let list = data.eccCurves
        return withUnsafeBytes(of: list.eccCurves) { raw in
          raw.bindMemory(to: TPM2_ECC_CURVE.self).prefix(Int(list.count)).map { UInt32($0) }
        }
      }.map(curveName)
      let supported = KeyAlgorithm.allCases.filter { testParms(ctx, $0) }
      let permanent = variable[TPM2_PT_VAR + 0] ?? 0
      return TPMInfo(
        manufacturer: text([fixed[TPM2_PT_FIXED + 5]]),
        vendor: text([6, 7, 8, 9].map { fixed[TPM2_PT_FIXED + $0] }),
        firmwareVersion: "\(fw1 >> 16).\(fw1 & 0xFFFF).\(fw2 >> 16).\(fw2 & 0xFFFF)",
        specRevision: "\(revision / 100).\(String(revision % 100).leftPadded(to: 2))",
        algorithms: algorithms, curves: curves, supportedKeys: supported,
        inLockout: permanent & 0x200 != 0,
        lockoutCounter: variable[TPM2_PT_VAR + 14] ?? 0,
        maxAuthFail: variable[TPM2_PT_VAR + 15] ?? 0,
        lockoutInterval: .seconds(variable[TPM2_PT_VAR + 16] ?? 0),
        transientSlots: fixed[TPM2_PT_FIXED + 14] ?? 0,
        persistentHandles: try handles(ctx, from: 0x8100_0000).compactMap { PersistentHandle(rawValue: $0) },
        endorsementCertificates: try handles(ctx, from: 0x01c0_0002, count: 32).filter {
          $0 >= 0x01c0_0002 && $0 <= 0x01c0_001f
        },
        tcti: tcti, hasResourceManager: !isDirect)
    }
  }

  /// Random bytes from the TPM's generator (TPM2_GetRandom, at most 32 bytes a command).
  public func randomBytes(_ count: Int) throws(TPMError) -> [UInt8] {
    guard count >= 0, count <= 4096 else {
      throw TPMError(.invalidArgument, reason: "ask for 0 to 4096 random bytes")
    }
    return try withESYS { ctx throws(TPMError) -> [UInt8] in
      var out: [UInt8] = []
      while out.count < count {
        var random: UnsafeMutablePointer<TPM2B_DIGEST>? = nil
        defer { esysFree(random) }
        try esys(
          "TPM2_GetRandom",
          Esys_GetRandom(
            ctx, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE),
            UInt16(min(32, count - out.count)), &random))
        let r = random!.pointee
        if r.size == 0 { break }
        withUnsafeBytes(of: r.buffer) { out += $0.prefix(Int(r.size)) }
      }
      return out
    }
  }

  /// Reads PCR values of one bank (TPM2_PCR_Read; the TPM returns up to 8 per command).
  /// PCRs the bank does not have are left out of the result.
  public func readPCRs(_ indices: [Int] = Array(0..<24), bank: HashAlgorithm = .sha256) throws(TPMError)
    -> [Int: [UInt8]]
  {
    guard indices.allSatisfy({ (0..<24).contains($0) }) else {
      throw TPMError(.invalidArgument, reason: "PCR indices are 0 to 23")
    }
    return try withESYS { ctx throws(TPMError) -> [Int: [UInt8]] in
      var remaining = Set(indices)
      var result: [Int: [UInt8]] = [:]
      while !remaining.isEmpty {
        var selection = TPML_PCR_SELECTION()
        selection.count = 1
        selection.pcrSelections.0.hash = bank.tpmID
        selection.pcrSelections.0.sizeofSelect = 3
        for i in remaining {
          withUnsafeMutableBytes(of: &selection.pcrSelections.0.pcrSelect) { $0[i / 8] |= UInt8(1 << (i % 8)) }
        }
        var counter: UInt32 = 0
        var selOut: UnsafeMutablePointer<TPML_PCR_SELECTION>? = nil
        var values: UnsafeMutablePointer<TPML_DIGEST>? = nil
        defer {
          esysFree(selOut)
          esysFree(values)
        }
        try esys(
          "TPM2_PCR_Read",
          Esys_PCR_Read(
            ctx, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), &selection,
            &counter, &selOut, &values))
        // The TPM answers in index order for what it read; it reads nothing it lacks.
        var read: [Int] = []
        if selOut!.pointee.count > 0 {
          withUnsafeBytes(of: selOut!.pointee.pcrSelections.0.pcrSelect) { bits in
            for i in 0..<24 where bits[i / 8] & UInt8(1 << (i % 8)) != 0 { read.append(i) }
          }
        }
        let digests = withUnsafeBytes(of: values!.pointee.digests) { raw in
          raw.bindMemory(to: TPM2B_DIGEST.self).prefix(Int(values!.pointee.count)).map { d in
            withUnsafeBytes(of: d.buffer) { Array($0.prefix(Int(d.size))) }
          }
        }
        if read.isEmpty { break }
        for (i, digest) in zip(read, digests) { result[i] = digest }
        remaining.subtract(read)
      }
      return result
    }
  }

  private func properties(_ ctx: OpaquePointer, from first: UInt32, count: UInt32) throws(TPMError)
    -> [UInt32: UInt32]
  {
    let pairs = try capabilityList(ctx, capability: TPM2_CAP_TPM_PROPERTIES, from: first, count: count) { data in
      let list = data.tpmProperties
      return withUnsafeBytes(of: list.tpmProperty) { raw in
        raw.bindMemory(to: TPMS_TAGGED_PROPERTY.self).prefix(Int(list.count)).map { ($0.property, $0.value) }
      }
    }
    return Dictionary(pairs, uniquingKeysWith: { a, _ in a })
  }

  private func capabilityList<T>(
    _ ctx: OpaquePointer, capability: TPM2_CAP, from first: UInt32, count: UInt32,
    _ extract: (TPMU_CAPABILITIES) -> [T]
  ) throws(TPMError) -> [T] {
    var more: TPMI_YES_NO = 0
    var data: UnsafeMutablePointer<TPMS_CAPABILITY_DATA>? = nil
    defer { esysFree(data) }
    try esys(
      "TPM2_GetCapability",
      Esys_GetCapability(
        ctx, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), capability, first, count,
        &more, &data))
    return extract(data!.pointee.data)
  }

  private func testParms(_ ctx: OpaquePointer, _ algorithm: KeyAlgorithm) -> Bool {
    let template = algorithm.template().publicArea
    var parms = TPMT_PUBLIC_PARMS()
    parms.type = template.type
    parms.parameters = template.parameters
    return Esys_TestParms(ctx, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), &parms) == 0
  }
}

private func algorithmName(_ id: UInt32) -> String {
  let names: [UInt32: String] = [
    0x0001: "rsa", 0x0003: "tdes", 0x0004: "sha1", 0x0005: "hmac", 0x0006: "aes", 0x0007: "mgf1",
    0x0008: "keyedhash", 0x000A: "xor", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512",
    0x0010: "null", 0x0012: "sm3_256", 0x0013: "sm4", 0x0014: "rsassa", 0x0015: "rsaes", 0x0016: "rsapss",
    0x0017: "oaep", 0x0018: "ecdsa", 0x0019: "ecdh", 0x001A: "ecdaa", 0x001B: "sm2", 0x001C: "ecschnorr",
    0x001D: "ecmqv", 0x0020: "kdf1_sp800_56a", 0x0021: "kdf2", 0x0022: "kdf1_sp800_108", 0x0023: "ecc",
    0x0025: "symcipher", 0x0026: "camellia", 0x0027: "sha3_256", 0x0028: "sha3_384", 0x0029: "sha3_512",
    0x003F: "cmac", 0x0040: "ctr", 0x0041: "ofb", 0x0042: "cbc", 0x0043: "cfb", 0x0044: "ecb",
  ]
  return names[id] ?? "0x" + String(id, radix: 16)
}

private func curveName(_ id: UInt32) -> String {
  let names: [UInt32: String] = [
    1: "nist_p192", 2: "nist_p224", 3: "nist_p256", 4: "nist_p384", 5: "nist_p521", 0x10: "bn_p256",
    0x11: "bn_p638", 0x20: "sm2_p256",
  ]
  return names[id] ?? "0x" + String(id, radix: 16)
}

extension String {
  func trimmingSpaces() -> String {
    var s = Substring(self)
    while s.first == " " { s.removeFirst() }
    while s.last == " " { s.removeLast() }
    return String(s)
  }
}
