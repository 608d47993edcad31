internal import CEdgeKeyProvider
internal import CTSS2

/// The endorsement keys of the TCG EK Credential Profile's low range: the manufacturer's
/// certificate for each sits at a fixed NV index, and the key itself is re-created from the
/// default template whenever it is needed (it is the same key every time: same seed, same
/// template).
public enum EndorsementKeyType: String, Sendable, CaseIterable {
  /// Template L-1: RSA 2048, certificate at 0x01C00002.
  case rsa2048 = "rsa-2048"
  /// Template L-2: ECC NIST P-256, certificate at 0x01C0000A.
  case eccP256 = "ecc-p256"

  /// The NV index of its certificate.
  public var certificateIndex: UInt32 {
    switch self {
    case .rsa2048: 0x01C0_0002
    case .eccP256: 0x01C0_000A
    }
  }

  /// PolicySecret(TPM_RH_ENDORSEMENT) with SHA-256: the EK's authPolicy in both low-range
  /// templates (TCG EK Credential Profile 2.x, B.3.3).
  static let policyA: [UInt8] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xB3, 0xF8, 0x1A, 0x90, 0xCC, 0x8D, 0x46, 0xA5, 0xD7, 0x24, 0xFD, 0x52, 0xD7,
    0x6E, 0x06, 0x52, 0x0B, 0x64, 0xF2, 0xA1, 0xDA, 0x1B, 0x33, 0x14, 0x69, 0xAA,
  ]

  /// fixedTPM, fixedParent, sensitiveDataOrigin, adminWithPolicy, restricted, decrypt.
  static let attributes: UInt32 = 0x0003_00B2

  /// The default template (TCG EK Credential Profile, B.3.3 and B.3.4).
  var template: TPM2B_PUBLIC {
    var t = TPM2B_PUBLIC()
    t.publicArea.nameAlg = TPM2_ALG_SHA256
    t.publicArea.objectAttributes = Self.attributes
    t.publicArea.authPolicy.size = UInt16(Self.policyA.count)
    withUnsafeMutableBytes(of: &t.publicArea.authPolicy.buffer) { $0.copyBytes(from: Self.policyA) }
    switch self {
    case .rsa2048:
      t.publicArea.type = TPM2_ALG_RSA
      t.publicArea.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_AES
      t.publicArea.parameters.rsaDetail.symmetric.keyBits.aes = 128
      t.publicArea.parameters.rsaDetail.symmetric.mode.aes = TPM2_ALG_CFB
      t.publicArea.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL
      t.publicArea.parameters.rsaDetail.keyBits = 2048
      t.publicArea.parameters.rsaDetail.exponent = 0
      // 256 zero bytes of unique: the template's own.
      t.publicArea.unique.rsa.size = 256
    case .eccP256:
      t.publicArea.type = TPM2_ALG_ECC
      t.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES
      t.publicArea.parameters.eccDetail.symmetric.keyBits.aes = 128
      t.publicArea.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB
      t.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL
      t.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256
      t.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL
      t.publicArea.unique.ecc.x.size = 32
      t.publicArea.unique.ecc.y.size = 32
    }
    return t
  }
}

extension TPM {
  /// The manufacturer's certificate for an endorsement key (DER, as stored at its NV index),
  /// or nil when the TPM has none there. TPM2_NV_ReadPublic and one TPM2_NV_Read per 512 bytes.
  public func endorsementCertificate(_ type: EndorsementKeyType) throws(TPMError) -> [UInt8]? {
    try withESYS { ctx throws(TPMError) -> [UInt8]? in
      let index = type.certificateIndex
      guard try handles(ctx, from: index, count: 1).first == index else { return nil }
      var nv = ESYS_TR(ESYS_TR_NONE)
      try esys(
        "TPM2_NV_ReadPublic", "opening the EK certificate's NV index",
        Esys_TR_FromTPMPublic(ctx, index, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), &nv))
      defer { Esys_TR_Close(ctx, &nv) }
      var nvPublic: UnsafeMutablePointer<TPM2B_NV_PUBLIC>? = nil
      var nvName: UnsafeMutablePointer<TPM2B_NAME>? = nil
      defer {
        esysFree(nvPublic)
        esysFree(nvName)
      }
      try esys(
        "TPM2_NV_ReadPublic", "reading the EK certificate's size",
        Esys_NV_ReadPublic(
          ctx, nv, ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE), &nvPublic, &nvName))
      let size = Int(nvPublic!.pointee.nvPublic.dataSize)
      // TCG: EK certificate indices are readable with their own (empty) auth, or the owner's.
      let authRead: UInt32 = 1 << 18
      let authHandle = nvPublic!.pointee.nvPublic.attributes & authRead != 0 ? nv : ESYS_TR(ESYS_TR_RH_OWNER)
      var out: [UInt8] = []
      while out.count < size {
        var chunk: UnsafeMutablePointer<TPM2B_MAX_NV_BUFFER>? = nil
        defer { esysFree(chunk) }
        try esys(
          "TPM2_NV_Read", "reading the EK certificate",
          Esys_NV_Read(
            ctx, authHandle, nv, ESYS_TR(ESYS_TR_PASSWORD), ESYS_TR(ESYS_TR_NONE), ESYS_TR(ESYS_TR_NONE),
            UInt16(min(512, size - out.count)), UInt16(out.count), &chunk))
        let c = chunk!.pointee
        if c.size == 0 { break }
        withUnsafeBytes(of: c.buffer) { out += $0.prefix(Int(c.size)) }
      }
      // Some TPMs pad the index with zeros or 0xFF after the certificate: keep the DER only.
      return Self.derPrefix(out) ?? out
    }
  }

  /// The endorsement key re-created from its default template (TPM2_CreatePrimary under the
  /// endorsement hierarchy, then flushed): its public part, to compare with the certificate's.
  /// RSA 2048 costs up to seconds on a real chip (the seed's key is derived anew).
  public func endorsementKey(_ type: EndorsementKeyType) throws(TPMError) -> PublicKey {
    try withESYS { ctx throws(TPMError) -> PublicKey in
      let (handle, key) = try createEndorsementKey(ctx, type)
      Esys_FlushContext(ctx, handle)
      return key
    }
  }

  /// TPM2_CreatePrimary of the EK from its default template; the caller flushes the handle.
  func createEndorsementKey(_ ctx: OpaquePointer, _ type: EndorsementKeyType) throws(TPMError)
    -> (handle: ESYS_TR, publicKey: PublicKey)
  {
    var sensitive = TPM2B_SENSITIVE_CREATE()
    var template = type.template
    var outside = TPM2B_DATA()
    var pcrs = TPML_PCR_SELECTION()
    var handle = ESYS_TR(ESYS_TR_NONE)
    var outPublic: UnsafeMutablePointer<TPM2B_PUBLIC>? = nil
    var creationData: UnsafeMutablePointer<TPM2B_CREATION_DATA>? = nil
    var creationHash: UnsafeMutablePointer<TPM2B_DIGEST>? = nil
    var ticket: UnsafeMutablePointer<TPMT_TK_CREATION>? = nil
    defer {
      esysFree(outPublic)
      esysFree(creationData)
      esysFree(creationHash)
      esysFree(ticket)
    }
    try esys(
      "TPM2_CreatePrimary", "re-creating the \(type.rawValue) endorsement key",
      Esys_CreatePrimary(
        ctx, ESYS_TR(ESYS_TR_RH_ENDORSEMENT), ESYS_TR(ESYS_TR_PASSWORD), ESYS_TR(ESYS_TR_NONE),
        ESYS_TR(ESYS_TR_NONE), &sensitive, &template, &outside, &pcrs, &handle, &outPublic, &creationData,
        &creationHash, &ticket))
    do {
      return (handle, try PublicKey(outPublic!.pointee))
    } catch {
      Esys_FlushContext(ctx, handle)
      throw error
    }
  }

  /// The DER TLV at the start of `bytes` (a SEQUENCE with a definite length), or nil.
  static func derPrefix(_ bytes: [UInt8]) -> [UInt8]? {
    guard bytes.count >= 2, bytes[0] == 0x30 else { return nil }
    let first = Int(bytes[1])
    var length = first
    var header = 2
    if first & 0x80 != 0 {
      let n = first & 0x7F
      guard n >= 1, n <= 3, bytes.count >= 2 + n else { return nil }
      length = bytes[2..<(2 + n)].reduce(0) { $0 << 8 | Int($1) }
      header = 2 + n
    }
    guard header + length <= bytes.count else { return nil }
    return Array(bytes[0..<(header + length)])
  }
}
