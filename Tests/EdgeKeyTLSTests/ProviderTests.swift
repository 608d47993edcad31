import CEdgeKeyProvider
import COpenSSL
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// The provider seen through OpenSSL's own APIs.
@Suite("the OpenSSL provider")
struct ProviderTests {
  @Test("key parameters come from memory, with no TPM traffic", arguments: KeyAlgorithm.allCases)
  func parametersFromMemory(_ algorithm: KeyAlgorithm) throws {
    let f = try Fixture(algorithm)
    let before = f.tpm.commandCount
    let pkey = try #require(edgekey_evp_pkey(f.key.raw))
    defer { EVP_PKEY_free(pkey) }
    #expect(edgekey_evp_pkey_is_tpm(pkey) == 1)
    let expected: (bits: Int32, size: Int32, security: Int32) =
      switch algorithm {
      case .eccP256: (256, 72, 128)
      case .eccP384: (384, 104, 192)
      case .rsa2048: (2048, 256, 112)
      case .rsa3072: (3072, 384, 128)
      }
    #expect(EVP_PKEY_get_bits(pkey) == expected.bits)
    #expect(EVP_PKEY_get_size(pkey) == expected.size)
    #expect(EVP_PKEY_get_security_bits(pkey) == expected.security)
    #expect(EVP_PKEY_is_a(pkey, algorithm.isECC ? "EC" : "RSA") == 1)
    #expect(f.tpm.commandCount == before, "no TPM command for parameters")
  }

  @Test("the private key cannot be exported; the public half can, and matches the TPM's")
  func exportRefusesPrivate() throws {
    let f = try Fixture()
    let pkey = try #require(edgekey_evp_pkey(f.key.raw))
    defer { EVP_PKEY_free(pkey) }
    // i2d_PrivateKey goes through export with the private selection: refused.
    var out: UnsafeMutablePointer<UInt8>?
    #expect(i2d_PrivateKey(pkey, &out) <= 0)
    ERR_clear_error()
    // The public half exports (SubjectPublicKeyInfo) and equals what the TPM reported.
    var spki: UnsafeMutablePointer<UInt8>?
    let n = i2d_PUBKEY(pkey, &spki)
    #expect(n > 0)
    if let spki { #expect(Array(UnsafeBufferPointer(start: spki, count: Int(n))) == f.key.publicKey.spki) }
    CRYPTO_free(spki, #file, #line)
  }

  @Test("SSL_CTX_check_private_key accepts the matching certificate and rejects another")
  func checkPrivateKey() throws {
    let f = try Fixture()
    let pkey = try #require(edgekey_evp_pkey(f.key.raw))
    defer { EVP_PKEY_free(pkey) }
    let good = try Certificate(pem: f.clientCertificatePEM)
    let other = try f.ca.issueServer()
    let wrong = try Certificate(pem: other.certificate)
    for (cert, expected) in [(good, Int32(1)), (wrong, Int32(0))] {
      let ctx = try #require(SSL_CTX_new(TLS_client_method()))
      defer { SSL_CTX_free(ctx) }
      #expect(SSL_CTX_use_certificate(ctx, cert.x509) == 1)
      if SSL_CTX_use_PrivateKey(ctx, pkey) == 1 {
        #expect(SSL_CTX_check_private_key(ctx) == expected)
      } else {
        #expect(expected == 0)  // libssl already refused the mismatch
      }
      ERR_clear_error()
    }
  }

  @Test("digests, randomness, ciphers and verification stay in the default provider")
  func noSoftwareOperations() throws {
    #expect(edgekey_provider_load() == 1)
    #expect(EVP_MD_fetch(nil, "SHA256", "provider=edgekey") == nil)
    #expect(EVP_CIPHER_fetch(nil, "AES-128-GCM", "provider=edgekey") == nil)
    #expect(EVP_RAND_fetch(nil, "CTR-DRBG", "provider=edgekey") == nil)
    ERR_clear_error()
    // An unqualified fetch, as libssl does for the server's key, finds the default provider.
    for name in ["EC", "RSA"] {
      let keymgmt = try #require(EVP_KEYMGMT_fetch(nil, name, nil))
      #expect(String(cString: OSSL_PROVIDER_get0_name(EVP_KEYMGMT_get0_provider(keymgmt))) == "default")
      EVP_KEYMGMT_free(keymgmt)
    }
    // Software key generation by name, as any other code in the process may do, still works.
    for _ in 0..<20 {
      let ctx = try #require(EVP_PKEY_CTX_new_from_name(nil, "EC", nil))
      defer { EVP_PKEY_CTX_free(ctx) }
      #expect(EVP_PKEY_keygen_init(ctx) == 1)
      EVP_PKEY_CTX_set_group_name(ctx, "P-256")
      var key: OpaquePointer?
      #expect(EVP_PKEY_generate(ctx, &key) == 1)
      if let key {
        #expect(edgekey_evp_pkey_is_tpm(key) == 0)
        EVP_PKEY_free(key)
      }
    }
    for name in ["ECDSA", "RSA"] {
      let signature = try #require(EVP_SIGNATURE_fetch(nil, name, nil))
      #expect(String(cString: OSSL_PROVIDER_get0_name(EVP_SIGNATURE_get0_provider(signature))) == "default")
      EVP_SIGNATURE_free(signature)
    }
  }

  @Test(
    "signing with a TPM key leaves unqualified EC and RSA fetches in the default provider",
    arguments: [KeyAlgorithm.eccP256, .rsa2048])
  func signingDoesNotCaptureFetches(_ algorithm: KeyAlgorithm) throws {
    // OpenSSL 3.0 caches the keymgmt EVP_DigestSignInit finds for a key under the empty query,
    // and a later lookup that names no provider matches that entry whatever its provider. With
    // the provider in the application's context, the sequence below (cache flushed, then a TPM
    // signature) made every later unqualified "EC" fetch return ours, in every run.
    let f = try Fixture(algorithm)
    let pkey = try #require(edgekey_evp_pkey(f.key.raw))
    defer { EVP_PKEY_free(pkey) }
    #expect(EVP_set_default_properties(nil, nil) == 1)  // empties the method cache
    let md = try #require(EVP_MD_CTX_new())
    defer { EVP_MD_CTX_free(md) }
    #expect(EVP_DigestSignInit(md, nil, EVP_sha256(), nil, pkey) == 1)
    let name = algorithm.isECC ? "EC" : "RSA"
    for query in [nil, ""] as [String?] {
      let keymgmt = try #require(EVP_KEYMGMT_fetch(nil, name, query))
      #expect(String(cString: OSSL_PROVIDER_get0_name(EVP_KEYMGMT_get0_provider(keymgmt))) == "default")
      EVP_KEYMGMT_free(keymgmt)
    }
    let ctx = try #require(EVP_PKEY_CTX_new_from_name(nil, name, nil))
    defer { EVP_PKEY_CTX_free(ctx) }
    #expect(EVP_PKEY_keygen_init(ctx) == 1)
    // The provider is nowhere in the application's context.
    #expect(EVP_KEYMGMT_fetch(nil, name, "provider=edgekey") == nil)
    ERR_clear_error()
  }

  @Test(
    "a CSR signed in the TPM is accepted by openssl req -verify, with the SANs and clientAuth asked for",
    arguments: [KeyAlgorithm.eccP256, .eccP384, .rsa2048])
  func csrVerifies(_ algorithm: KeyAlgorithm) throws {
    let f = try Fixture(algorithm)
    let csr = try CertificateSigningRequest(
      key: f.key, subject: [("O", "EdgeKey Fleet"), ("CN", "device-0042")],
      subjectAlternativeNames: [.dns("device-0042.fleet.example"), .ip("10.1.2.3"), .uri("urn:edgekey:device:0042")],
      challengePassword: "one-time-secret")
    let file = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-csr-\(UUID().uuidString).pem")
    defer { try? FileManager.default.removeItem(at: file) }
    try csr.pem.write(to: file, atomically: true, encoding: .utf8)
    let result = try Command.runCapturing("openssl", ["req", "-in", file.path, "-verify", "-noout", "-text"])
    #expect(result.status == 0, "\(result.stderr)")
    let text = result.stdout + result.stderr
    #expect(text.contains("verify OK") || text.contains("Certificate request self-signature verify OK"))
    #expect(text.contains("O = EdgeKey Fleet, CN = device-0042"))
    #expect(text.contains("DNS:device-0042.fleet.example"))
    #expect(text.contains("IP Address:10.1.2.3"))
    #expect(text.contains("URI:urn:edgekey:device:0042"))
    #expect(text.contains("TLS Web Client Authentication"))
    #expect(text.contains("challengePassword"))
    #expect(text.contains(algorithm.isECC ? "ecdsa-with-SHA" : "sha256WithRSAEncryption"))
  }

  @Test("concurrent handshakes on several threads all succeed and each signs once")
  func concurrentHandshakes() async throws {
    let f = try Fixture()
    let server = try f.server(["-tls1_3"])
    let context = try f.context(resumesSessions: false)  // full handshakes: each one signs
    _ = try f.fetchPage(context, port: server.port)
    let before = f.tpm.commandCount
    let threads = 8
    let perThread = 5
    let failures = try await withThrowingTaskGroup(of: Int.self) { group in
      for _ in 0..<threads {
        group.addTask {
          var failed = 0
          for _ in 0..<perThread {
            do {
              let (page, _) = try f.fetchPage(context, port: server.port)
              if !page.contains("Subject: CN=device-0001") { failed += 1 }
            } catch {
              failed += 1
            }
          }
          return failed
        }
      }
      return try await group.reduce(0, +)
    }
    #expect(failures == 0)
    #expect(f.tpm.commandCount - before == UInt64(threads * perThread))
  }

  @Test("the C API: a key file opened in C signs through EVP_DigestSign and verifies in software")
  func cAPISignsFromFile() throws {
    let f = try Fixture()
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-c-\(UUID().uuidString).pem")
    defer { try? FileManager.default.removeItem(at: path) }
    let file = try f.tpm.createKey()
    try file.write(to: path.path)
    var key: OpaquePointer?
    var why = [CChar](repeating: 0, count: 256)
    #expect(edgekey_tpm_key_from_file(f.tpm.raw, path.path, nil, 0, &key, &why, why.count) == 0)
    let pkey = try #require(edgekey_evp_pkey(try #require(key)))
    edgekey_tpm_key_free(key)  // the EVP_PKEY holds its own reference
    defer { EVP_PKEY_free(pkey) }
    let message = Array("telemetry frame 42".utf8)
    let sign = EVP_MD_CTX_new()
    defer { EVP_MD_CTX_free(sign) }
    #expect(EVP_DigestSignInit_ex(sign, nil, "SHA256", nil, nil, pkey, nil) == 1)
    var length = 0
    #expect(EVP_DigestSign(sign, nil, &length, message, message.count) == 1)
    var signature = [UInt8](repeating: 0, count: length)
    #expect(EVP_DigestSign(sign, &signature, &length, message, message.count) == 1)
    // Verify with a software copy of the public key: OpenSSL's default provider, not ours.
    let spki = try file.publicKey().spki
    let pub = try #require(
      spki.withUnsafeBufferPointer { buffer -> OpaquePointer? in
        var p = buffer.baseAddress
        return d2i_PUBKEY(nil, &p, buffer.count)
      })
    defer { EVP_PKEY_free(pub) }
    let verify = EVP_MD_CTX_new()
    defer { EVP_MD_CTX_free(verify) }
    #expect(EVP_DigestVerifyInit_ex(verify, nil, "SHA256", nil, nil, pub, nil) == 1)
    #expect(EVP_DigestVerify(verify, signature, length, message, message.count) == 1)
    // A damaged path reads clearly.
    #expect(edgekey_tpm_key_from_file(f.tpm.raw, "/nonexistent/key.pem", nil, 0, &key, &why, why.count) != 0)
    #expect(cStringOf(why).contains("cannot open"))
  }

  @Test(
    "mosquitto with require_certificate accepts us and sees our identity",
    arguments: [KeyAlgorithm.eccP256, .eccP384, .rsa2048], [TLSVersion.tls12, .tls13])
  func mosquittoAcceptsUs(_ algorithm: KeyAlgorithm, _ version: TLSVersion) throws {
    let f = try Fixture(algorithm, commonName: "device-0007")
    let serverCert = try f.ca.issueServer()
    let broker = try MosquittoBroker(
      certificatePEM: serverCert.certificate, keyPEM: serverCert.key, clientCAPEM: f.ca.certificatePEM)
    let context = try f.context(serverName: "127.0.0.1", maximumVersion: version)
    let connection = try TLSConnection(context: context, host: "127.0.0.1", port: broker.port)
    // MQTT 3.1.1 CONNECT, clean session, keepalive 60, client id "edgekey-test".
    let clientID = Array("edgekey-test".utf8)
    let variable: [UInt8] = [0, 4] + Array("MQTT".utf8) + [4, 0x02, 0, 60]
    let payload: [UInt8] = [0, UInt8(clientID.count)] + clientID
    try connection.write([0x10, UInt8(variable.count + payload.count)] + variable + payload)
    let connack = try connection.read()
    #expect(connack == [0x20, 0x02, 0x00, 0x00], "CONNACK accepted")
    #expect(connection.protocolVersion == (version == .tls13 ? "TLSv1.3" : "TLSv1.2"))
    #expect(broker.log.contains("u'device-0007'"))
  }
}

func cStringOf(_ buffer: [CChar]) -> String {
  String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

extension KeyAlgorithm {
  var isECC: Bool { self == .eccP256 || self == .eccP384 }
}
