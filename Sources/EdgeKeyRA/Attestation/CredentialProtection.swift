internal import CEdgeKeyProvider
internal import COpenSSL
import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM

/// TPM2_MakeCredential in software (TPM 2.0 Part 1, "Credential Protection"; Part 1 §11.4.10
/// KDFa and KDFe): the verifier's half of credential activation, for an endorsement key of the
/// TCG default templates (name algorithm SHA-256, AES-128-CFB, so a 32-byte seed):
///
/// - the seed is encrypted to the EK: RSA-OAEP with SHA-256 and the label "IDENTITY\0", or, for
///   an ECC EK, ECDH with an ephemeral key on its curve and the seed derived by KDFe with the
///   label "IDENTITY" (the encrypted secret is then the ephemeral public point);
/// - symKey = KDFa(SHA-256, seed, "STORAGE", Name(AK), -, 128) encrypts the credential (as a
///   TPM2B_DIGEST) with AES-128-CFB and a zero IV;
/// - HMACkey = KDFa(SHA-256, seed, "INTEGRITY", -, -, 256) makes the outer HMAC over the
///   ciphertext and the AK's Name.
///
/// Only a TPM holding that EK's private key, with an object of that Name loaded, gives the
/// credential back (``AttestationKey/activateCredential(_:endorsementKey:)``).
package enum CredentialProtection {
  package struct Failure: Error, CustomStringConvertible {
    package var description: String
  }

  /// Makes the challenge for `credential` (at most 32 bytes) and the AK whose TPM Name is
  /// `objectName`, sealed to the endorsement key `endorsementKeySPKI` (an RSA or EC P-256
  /// SubjectPublicKeyInfo, as its certificate carries it).
  package static func makeCredential(credential: [UInt8], objectName: [UInt8], endorsementKeySPKI: [UInt8])
    throws(Failure) -> CredentialChallenge
  {
    guard !credential.isEmpty, credential.count <= 32 else {
      throw Failure(description: "a credential is 1 to 32 bytes")
    }
    guard objectName.count == 34, objectName[0] == 0x00, objectName[1] == 0x0B else {
      throw Failure(description: "the object's Name is not a SHA-256 Name")
    }
    guard let ek = parsePublicKey(endorsementKeySPKI) else {
      throw Failure(description: "the endorsement key is not a public key OpenSSL reads")
    }
    defer { EVP_PKEY_free(ek) }
    let seed: [UInt8]
    let encryptedSecret: [UInt8]
    if EVP_PKEY_is_a(ek, "RSA") == 1 {
      seed = try randomBytes(32)
      encryptedSecret = try oaepEncrypt(seed, to: ek, label: Array("IDENTITY".utf8) + [0])
    } else if EVP_PKEY_is_a(ek, "EC") == 1 {
      (seed, encryptedSecret) = try ecdhSeed(with: ek)
    } else {
      throw Failure(description: "the endorsement key is neither RSA nor EC")
    }
    let symmetricKey = kdfA(key: seed, label: "STORAGE", contextU: objectName, contextV: [], bits: 128)
    let plain = [UInt8(credential.count >> 8), UInt8(credential.count & 0xFF)] + credential
    let encrypted = try aes128CFB(plain, key: symmetricKey)
    let hmacKey = kdfA(key: seed, label: "INTEGRITY", contextU: [], contextV: [], bits: 256)
    let integrity = hmacSHA256(key: hmacKey, encrypted + objectName)
    // TPM2B_ID_OBJECT { TPM2B_DIGEST integrityHMAC, encIdentity }, TPM2B_ENCRYPTED_SECRET.
    let idObject = [0x00, 0x20] + integrity + encrypted
    return CredentialChallenge(
      credentialBlob: sized(idObject), encryptedSecret: sized(encryptedSecret))
  }

  /// KDFa (Part 1 §11.4.10.2) with HMAC-SHA-256.
  package static func kdfA(key: [UInt8], label: String, contextU: [UInt8], contextV: [UInt8], bits: Int) -> [UInt8] {
    var out: [UInt8] = []
    var counter: UInt32 = 1
    while out.count * 8 < bits {
      let block = bigEndian(counter) + Array(label.utf8) + [0] + contextU + contextV + bigEndian(UInt32(bits))
      out += hmacSHA256(key: key, block)
      counter += 1
    }
    return Array(out.prefix(bits / 8))
  }

  /// KDFe (Part 1 §11.4.10.3) with SHA-256.
  package static func kdfE(z: [UInt8], label: String, partyU: [UInt8], partyV: [UInt8], bits: Int) -> [UInt8] {
    var out: [UInt8] = []
    var counter: UInt32 = 1
    while out.count * 8 < bits {
      out += sha256(bigEndian(counter) + z + Array(label.utf8) + [0] + partyU + partyV)
      counter += 1
    }
    return Array(out.prefix(bits / 8))
  }

  // MARK: - OpenSSL

  static func parsePublicKey(_ spki: [UInt8]) -> OpaquePointer? {
    spki.withUnsafeBufferPointer { buffer -> OpaquePointer? in
      var p = buffer.baseAddress
      let key = d2i_PUBKEY(nil, &p, buffer.count)
      if key == nil { ERR_clear_error() }
      return key
    }
  }

  private static func oaepEncrypt(_ seed: [UInt8], to key: OpaquePointer, label: [UInt8]) throws(Failure) -> [UInt8] {
    guard let ctx = EVP_PKEY_CTX_new_from_pkey(nil, key, nil) else { throw Failure(description: "out of memory") }
    defer { EVP_PKEY_CTX_free(ctx) }
    guard EVP_PKEY_encrypt_init(ctx) == 1, EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1,
      EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256()) == 1, EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1
    else {
      ERR_clear_error()
      throw Failure(description: "RSA-OAEP with SHA-256 cannot be set up")
    }
    // The context takes ownership of the label, so it is OpenSSL's own allocation.
    guard let owned = CRYPTO_malloc(label.count, #fileID, #line) else { throw Failure(description: "out of memory") }
    label.withUnsafeBytes { owned.copyMemory(from: $0.baseAddress!, byteCount: label.count) }
    guard EVP_PKEY_CTX_set0_rsa_oaep_label(ctx, owned, Int32(label.count)) == 1 else {
      CRYPTO_free(owned, #fileID, #line)
      ERR_clear_error()
      throw Failure(description: "the OAEP label cannot be set")
    }
    var length = 0
    guard EVP_PKEY_encrypt(ctx, nil, &length, seed, seed.count) == 1 else {
      ERR_clear_error()
      throw Failure(description: "RSA-OAEP encryption failed")
    }
    var out = [UInt8](repeating: 0, count: length)
    guard EVP_PKEY_encrypt(ctx, &out, &length, seed, seed.count) == 1 else {
      ERR_clear_error()
      throw Failure(description: "RSA-OAEP encryption failed")
    }
    return Array(out.prefix(length))
  }

  /// An ephemeral key on the EK's curve; Z = x(ECDH); seed = KDFe(Z, "IDENTITY", x(ephemeral),
  /// x(EK)). The encrypted secret is the ephemeral point as a TPMS_ECC_POINT.
  private static func ecdhSeed(with ek: OpaquePointer) throws(Failure) -> (seed: [UInt8], secret: [UInt8]) {
    guard let ekPoint = ecPoint(ek) else { throw Failure(description: "the EC endorsement key has no point") }
    guard let generate = EVP_PKEY_CTX_new_from_pkey(nil, ek, nil) else { throw Failure(description: "out of memory") }
    defer { EVP_PKEY_CTX_free(generate) }
    var ephemeral: OpaquePointer? = nil
    guard EVP_PKEY_keygen_init(generate) == 1, EVP_PKEY_keygen(generate, &ephemeral) == 1, let ephemeral else {
      ERR_clear_error()
      throw Failure(description: "no ephemeral key on the EK's curve")
    }
    defer { EVP_PKEY_free(ephemeral) }
    guard let derive = EVP_PKEY_CTX_new_from_pkey(nil, ephemeral, nil) else {
      throw Failure(description: "out of memory")
    }
    defer { EVP_PKEY_CTX_free(derive) }
    var length = 0
    guard EVP_PKEY_derive_init(derive) == 1, EVP_PKEY_derive_set_peer(derive, ek) == 1,
      EVP_PKEY_derive(derive, nil, &length) == 1
    else {
      ERR_clear_error()
      throw Failure(description: "ECDH with the endorsement key failed")
    }
    var z = [UInt8](repeating: 0, count: length)
    guard EVP_PKEY_derive(derive, &z, &length) == 1, let point = ecPoint(ephemeral) else {
      ERR_clear_error()
      throw Failure(description: "ECDH with the endorsement key failed")
    }
    let seed = kdfE(z: Array(z.prefix(length)), label: "IDENTITY", partyU: point.x, partyV: ekPoint.x, bits: 256)
    return (seed, sized(point.x) + sized(point.y))
  }

  /// The affine coordinates of an EC key, each as long as the field.
  private static func ecPoint(_ key: OpaquePointer) -> (x: [UInt8], y: [UInt8])? {
    var length = 0
    guard EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_PUB_KEY, nil, 0, &length) == 1 else {
      ERR_clear_error()
      return nil
    }
    var encoded = [UInt8](repeating: 0, count: length)
    guard EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_PUB_KEY, &encoded, length, &length) == 1,
      length > 1, encoded[0] == 0x04, length % 2 == 1
    else {
      ERR_clear_error()
      return nil
    }
    let half = (length - 1) / 2
    return (Array(encoded[1...half]), Array(encoded[(half + 1)..<length]))
  }

  private static func aes128CFB(_ plain: [UInt8], key: [UInt8]) throws(Failure) -> [UInt8] {
    guard let ctx = EVP_CIPHER_CTX_new() else { throw Failure(description: "out of memory") }
    defer { EVP_CIPHER_CTX_free(ctx) }
    let iv = [UInt8](repeating: 0, count: 16)
    var out = [UInt8](repeating: 0, count: plain.count + 16)
    var n: Int32 = 0
    var tail: Int32 = 0
    guard EVP_EncryptInit_ex(ctx, EVP_aes_128_cfb128(), nil, key, iv) == 1,
      EVP_EncryptUpdate(ctx, &out, &n, plain, Int32(plain.count)) == 1
    else {
      ERR_clear_error()
      throw Failure(description: "AES-128-CFB failed")
    }
    let written = Int(n)
    let final = out.withUnsafeMutableBufferPointer { EVP_EncryptFinal_ex(ctx, $0.baseAddress! + written, &tail) }
    guard final == 1 else {
      ERR_clear_error()
      throw Failure(description: "AES-128-CFB failed")
    }
    return Array(out.prefix(written + Int(tail)))
  }

  static func hmacSHA256(key: [UInt8], _ data: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    var length: UInt32 = 32
    _ = HMAC(EVP_sha256(), key, Int32(key.count), data, data.count, &out, &length)
    return out
  }

  static func sha256(_ data: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    data.withUnsafeBufferPointer { edgekey_sha256($0.baseAddress, $0.count, &out) }
    return out
  }

  static func randomBytes(_ count: Int) throws(Failure) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    guard RAND_bytes(&out, Int32(count)) == 1 else { throw Failure(description: "no random bytes") }
    return out
  }

  private static func bigEndian(_ v: UInt32) -> [UInt8] {
    [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)]
  }

  /// A TPM2B: a 16-bit big-endian size, then the bytes.
  static func sized(_ bytes: [UInt8]) -> [UInt8] { [UInt8(bytes.count >> 8), UInt8(bytes.count & 0xFF)] + bytes }
}
