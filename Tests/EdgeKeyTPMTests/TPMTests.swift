import CEdgeKeyProvider
import CEdgeKeyTestHelpers
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// A fresh directory for one test's files.
func scratchDirectory() throws -> URL {
  let url = FileManager.default.temporaryDirectory.appendingPathComponent("edgekey-test-\(UUID().uuidString)")
  try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
  return url
}

func randomDigest(_ hash: HashAlgorithm) -> [UInt8] {
  (0..<hash.digestLength).map { _ in UInt8.random(in: 0...255) }
}

/// Verifies `signature` over `digest` with OpenSSL's command line: an independent verifier.
func verifyWithOpenSSL(
  publicKeyPEM: String, digest: [UInt8], signature: Signature, in dir: URL
) throws -> Bool {
  let pub = dir.appendingPathComponent("verify-pub.pem")
  let dig = dir.appendingPathComponent("verify-digest.bin")
  let sig = dir.appendingPathComponent("verify-sig.bin")
  try publicKeyPEM.write(to: pub, atomically: true, encoding: .utf8)
  try Data(digest).write(to: dig)
  try Data(signature.bytes).write(to: sig)
  var args = ["pkeyutl", "-verify", "-pubin", "-inkey", pub.path, "-in", dig.path, "-sigfile", sig.path]
  if let padding = signature.padding {
    args += ["-pkeyopt", "digest:\(signature.hash.rawValue)"]
    if padding == .pss {
      args += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]
    }
  }
  let result = try Command.runCapturing("openssl", args)
  return result.status == 0 && result.stdout.contains("Signature Verified Successfully")
}

@Suite("TPM layer on swtpm")
struct TPMTests {
  @Test(
    "delay:MS: in front of a TCTI gives each command a real chip's latency (a mock of what swtpm cannot have); a bad one is refused"
  )
  func delayedTCTI() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: "delay:150:" + swtpm.tcti)
    #expect(tpm.isDirect, "the delay wraps swtpm, which has no resource manager")
    let key = try tpm.loadKey(try tpm.createKey())
    try key.load()
    let before = tpm.commandCount
    let clock = ContinuousClock()
    let start = clock.now
    let digest = randomDigest(.sha256)
    let signature = try key.sign(digest: digest, hash: .sha256)
    let took = clock.now - start
    #expect(tpm.commandCount - before == 1, "one TPM2_Sign")
    // A lower bound only: the wrapper delays each command by at least its latency.
    #expect(took >= .milliseconds(150), "\(took)")
    let dir = try scratchDirectory()
    #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
    for bad in ["delay:x:", "delay:-5:", "delay:100"] {
      #expect(throws: TPMError.self, "\(bad)") { _ = try TPM.open(tcti: bad + swtpm.tcti) }
    }
  }

  @Test("a TPM that is not there gives a typed error naming every TCTI tried")
  func unreachableTPMNamesWhatWasTried() throws {
    let port = try PortFinder.freePair()
    let tcti = "swtpm:host=127.0.0.1,port=\(port)"
    do {
      _ = try TPM.open(tcti: tcti)
      Issue.record("opened a TPM on a port where nothing listens")
    } catch {
      #expect(error.code == .unreachable)
      #expect(error.reason.contains(tcti))
      #expect(error.reason.contains("device:/dev/tpmrm0"))
      #expect(error.description.contains("unreachable"))
    }
  }

  @Test("every key type is created, signs, and verifies in software", arguments: KeyAlgorithm.allCases)
  func everyKeyTypeSigns(_ algorithm: KeyAlgorithm) throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let file = try tpm.createKey(algorithm)
    let key = try tpm.loadKey(file)
    #expect(key.algorithm == algorithm)
    #expect(key.publicKey.attributes == .deviceKey)
    let paddings: [RSAPadding] = algorithm.isECC ? [.pkcs1] : [.pkcs1, .pss]
    for padding in paddings {
      let digest = randomDigest(algorithm.preferredHash)
      let signature = try key.sign(digest: digest, hash: algorithm.preferredHash, padding: padding)
      #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
      // A signature over another digest must not verify: the check above can fail.
      #expect(
        try !verifyWithOpenSSL(
          publicKeyPEM: key.publicKey.pem, digest: randomDigest(algorithm.preferredHash), signature: signature, in: dir)
      )
    }
    #expect(key.loadCount == 1)
  }

  @Test("keys persisted or kept as files survive a power cycle", arguments: KeyAlgorithm.allCases)
  func keysSurvivePowerCycle(_ algorithm: KeyAlgorithm) throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let handle = PersistentHandle(rawValue: 0x8100_0010)!
    let keyPath = dir.appendingPathComponent("device.key").path
    do {
      let tpm = try TPM.open(tcti: swtpm.tcti)
      let file = try tpm.createKey(algorithm)
      try file.write(to: keyPath)
      try tpm.persist(file, at: handle)
      #expect(try tpm.persistentHandles().contains(handle))
    }
    try swtpm.powerCycle()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let fromFile = try tpm.loadKey(try TSS2PrivateKey(contentsOf: keyPath))
    let persisted = try tpm.loadKey(at: handle)
    #expect(fromFile.publicKey == persisted.publicKey)
    for key in [fromFile, persisted] {
      let digest = randomDigest(algorithm.preferredHash)
      let signature = try key.sign(digest: digest, hash: algorithm.preferredHash)
      #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
    }
    try tpm.evict(handle)
    #expect(try !tpm.persistentHandles().contains(handle))
    #expect(throws: TPMError.self) { try tpm.loadKey(at: handle) }
  }

  @Test("a loaded key is loaded again after the TPM resets under it")
  func keyReloadsAfterReset() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let key = try tpm.loadKey(try tpm.createKey())
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
    #expect(key.loadCount == 1)
    try swtpm.powerCycle()
    let digest = randomDigest(.sha256)
    let signature = try key.sign(digest: digest, hash: .sha256)
    #expect(key.loadCount == 2)
    #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
  }

  @Test("a TPM that goes away is a typed error on every try, not a stuck context; back, the key signs again")
  func tpmGoneAndBack() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let key = try tpm.loadKey(try tpm.createKey())
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
    swtpm.stop()
    for _ in 0..<3 {
      // Each attempt reaches for the TPM again (ESAPI made anew after the transport failure).
      #expect {
        _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
      } throws: { error in
        let e = error as! TPMError
        return e.responseCode?.layer == 10 && "\(e)".contains("TPM2_Sign") || "\(e)".contains("Esys_Initialize")
      }
    }
    try swtpm.start()  // a reset: our key is no longer loaded
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
    #expect(key.loadCount == 2)
    _ = try tpm.info()  // the Swift layer's own commands work again too
  }

  @Test("tpm2-openssl loads and signs with a key file we wrote")
  func tpm2OpensslReadsOurKeyFile() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let file = try tpm.createKey(.eccP256)
    let keyPath = dir.appendingPathComponent("ours.pem")
    try file.write(to: keyPath.path)
    let digest = randomDigest(.sha256)
    try Data(digest).write(to: dir.appendingPathComponent("digest.bin"))
    try swtpm.run(
      "openssl",
      [
        "pkeyutl", "-provider", "tpm2", "-provider", "default", "-sign", "-inkey", keyPath.path, "-in",
        dir.appendingPathComponent("digest.bin").path, "-out", dir.appendingPathComponent("sig.der").path,
      ])
    let sig = try [UInt8](Data(contentsOf: dir.appendingPathComponent("sig.der")))
    let publicKey = try file.publicKey()
    #expect(
      try verifyWithOpenSSL(
        publicKeyPEM: publicKey.pem, digest: digest, signature: Signature(bytes: sig, hash: .sha256, padding: nil),
        in: dir))
    // And tpm2-openssl derives the same public key from our file.
    let theirs = try swtpm.run(
      "openssl", ["pkey", "-provider", "tpm2", "-provider", "default", "-in", keyPath.path, "-pubout"])
    #expect(theirs == publicKey.pem)
  }

  @Test("a key file tpm2-openssl wrote loads and signs through our layer")
  func ourLayerReadsTpm2OpensslKeyFile() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let keyPath = dir.appendingPathComponent("theirs.pem").path
    try swtpm.run(
      "openssl", ["genpkey", "-provider", "tpm2", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", keyPath])
    let theirPublic = try swtpm.run(
      "openssl", ["pkey", "-provider", "tpm2", "-provider", "default", "-in", keyPath, "-pubout"])
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let key = try tpm.loadKey(try TSS2PrivateKey(contentsOf: keyPath))
    #expect(key.publicKey.pem == theirPublic)
    let digest = randomDigest(.sha256)
    let signature = try key.sign(digest: digest, hash: .sha256)
    #expect(try verifyWithOpenSSL(publicKeyPEM: theirPublic, digest: digest, signature: signature, in: dir))
    // The file decodes and re-encodes to the same bytes.
    let text = try String(contentsOfFile: keyPath, encoding: .utf8)
    #expect(try TSS2PrivateKey(pem: try TSS2PrivateKey(pem: text).pem) == TSS2PrivateKey(pem: text))
  }

  @Test("tpm2_readpublic shows our key cannot leave the TPM")
  func readPublicShowsNonExportable() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let handle = PersistentHandle(rawValue: 0x8100_0020)!
    try tpm.persist(try tpm.createKey(.eccP256), at: handle)
    let output = try swtpm.run("tpm2_readpublic", ["-c", handle.description])
    let attributes = output.split(separator: "\n").first { $0.contains("value:") && output.contains("attributes") }
    #expect(output.contains("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign"))
    #expect(attributes != nil)
    #expect(!output.contains("decrypt"))
    // Persisting twice at the same handle is a typed error.
    do {
      try tpm.persist(try tpm.createKey(.eccP256), at: handle)
      Issue.record("persisted over an occupied handle")
    } catch {
      #expect(error.code == .handleInUse)
    }
  }

  @Test("objects leaked by a dead process are flushed when the TPM is opened")
  func leakedTransientsAreRecovered() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    // tpm2-tools over a direct TCTI leaves each primary loaded when it exits: a real leak.
    for i in 0..<3 {
      try swtpm.run("tpm2_createprimary", ["-C", "o", "-c", dir.appendingPathComponent("p\(i).ctx").path])
    }
    #expect(try swtpm.run("tpm2_getcap", ["handles-transient"]).split(separator: "\n").count == 3)
    let tpm = try TPM.open(tcti: swtpm.tcti)
    #expect(tpm.leakedObjectsFlushed == 3)
    let key = try tpm.loadKey(try tpm.createKey())
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
  }

  @Test(
    "objects leaked while we run fill the slots: flushed when room is needed, however the TCTI is spelled",
    arguments: ["swtpm:", "libtss2-tcti-swtpm.so.0:"])
  func leakedWhileRunningAreRecovered(_ spelling: String) throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tcti = spelling + "host=127.0.0.1,port=\(swtpm.port)"
    let tpm = try TPM.open(tcti: tcti)
    #expect(tpm.isDirect)
    for i in 0..<3 {
      try swtpm.run("tpm2_createprimary", ["-C", "o", "-c", dir.appendingPathComponent("p\(i).ctx").path])
    }
    let key = try tpm.loadKey(try tpm.createKey())
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
    #expect(tpm.leakedObjectsFlushed >= 2)
    // Only our key is left loaded.
    #expect(try swtpm.run("tpm2_getcap", ["handles-transient"]).split(separator: "\n").count == 1)
  }

  @Test("a full slot table reads clearly")
  func fullSlotTableIsTyped() throws {
    let error = TPMError(responseCode: 0x902, command: "TPM2_Load")
    #expect(error.code == .objectSlotsFull)
    #expect(error.description.contains("slots are full"))
    let timeout = TPMError(responseCode: ResponseCode.timeout.rawValue, command: "TPM2_Sign")
    #expect(timeout.code == .timeout)
    #expect(ResponseCode.timeout.decoded.contains("did not answer in time"))
  }

  @Test("a wrong auth value and a TPM in lockout each read clearly")
  func wrongAuthAndLockout() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    // Our password keys: the auth value is enforced, and each wrong guess is a DA strike.
    let secret = Array("s3cret".utf8)
    let file = try tpm.createKey(.eccP256, authValue: secret)
    #expect(!file.emptyAuth)
    #expect(try file.publicKey().attributes == .passwordDeviceKey)
    let right = try tpm.loadKey(file, authValue: secret)
    _ = try right.sign(digest: randomDigest(.sha256), hash: .sha256)
    let wrong = try tpm.loadKey(file, authValue: Array("guess".utf8))
    do {
      _ = try wrong.sign(digest: randomDigest(.sha256), hash: .sha256)
      Issue.record("signed with a wrong password")
    } catch {
      #expect(error.code == .authFailed)
      #expect(error.command == "TPM2_Sign")
    }
    #expect(try tpm.info().lockoutCounter == 1)
    try swtpm.run("tpm2_dictionarylockout", ["-c"])
    // tpm2-openssl's keys are DA-protected: with a threshold of 2, wrong guesses lock the TPM out.
    let theirs = dir.appendingPathComponent("da.pem").path
    // Over a direct TCTI there are 3 slots: make room for tpm2-openssl's primary and key.
    right.unload()
    wrong.unload()
    try swtpm.run(
      "openssl", ["genpkey", "-provider", "tpm2", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", theirs])
    try swtpm.run("tpm2_dictionarylockout", ["-s", "-n", "2", "-t", "600", "-l", "600"])
    let guessed = try tpm.loadKey(try TSS2PrivateKey(contentsOf: theirs), authValue: Array("guess".utf8))
    var codes: [TPMError.Code] = []
    for _ in 0..<3 {
      do { _ = try guessed.sign(digest: randomDigest(.sha256), hash: .sha256) } catch { codes.append(error.code) }
    }
    #expect(codes.first == .authFailed)
    #expect(codes.last == .lockout)
    #expect(try tpm.info().inLockout)
    let lockout = TPMError(responseCode: 0x921, command: "TPM2_Sign")
    #expect(lockout.description.contains("dictionary-attack lockout"))
  }

  @Test("a key with a password writes emptyAuth FALSE, and tpm2-openssl signs with it given the password")
  func tpm2OpensslSignsWithOurPasswordKey() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let file = try tpm.createKey(.eccP256, authValue: Array("s3cret".utf8))
    // [0] EXPLICIT BOOLEAN FALSE right after the type OID: present, not left to DER's default.
    #expect(Array(file.der[11..<16]) == [0xA0, 0x03, 0x01, 0x01, 0x00])
    #expect(try TSS2PrivateKey(der: file.der) == file)
    let keyPath = dir.appendingPathComponent("password.pem").path
    try file.write(to: keyPath)
    let digest = randomDigest(.sha256)
    let digestPath = dir.appendingPathComponent("digest.bin").path
    let signaturePath = dir.appendingPathComponent("sig.der").path
    try Data(digest).write(to: URL(fileURLWithPath: digestPath))
    // Free the slots: tpm2-openssl loads its own SRK and the key over the same direct TCTI.
    _ = try tpm.flushAllTransientObjects()
    try swtpm.run(
      "openssl",
      [
        "pkeyutl", "-provider", "tpm2", "-provider", "default", "-sign", "-inkey", keyPath, "-passin",
        "pass:s3cret", "-in", digestPath, "-out", signaturePath,
      ])
    let signature = Signature(bytes: try [UInt8](Data(contentsOf: URL(fileURLWithPath: signaturePath))), hash: .sha256)
    #expect(
      try verifyWithOpenSSL(publicKeyPEM: try file.publicKey().pem, digest: digest, signature: signature, in: dir))
    #expect(try tpm.info().lockoutCounter == 0)
  }

  @Test("a password key used without its password is refused before any TPM command: no DA strike")
  func missingPasswordCostsNoStrike() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let file = try tpm.createKey(.eccP256, authValue: Array("s3cret".utf8))
    let keyPath = dir.appendingPathComponent("password.pem").path
    try file.write(to: keyPath)
    let before = tpm.commandCount
    for _ in 0..<3 {
      do {
        _ = try tpm.loadKey(try TSS2PrivateKey(contentsOf: keyPath))
        Issue.record("opened a password key without its password")
      } catch {
        #expect(error.code == .authRequired)
        #expect(error.reason.contains("no dictionary-attack strike"))
      }
    }
    #expect(tpm.commandCount == before)
    // The C API for daemons refuses the same way.
    var raw: OpaquePointer? = nil
    var why = [CChar](repeating: 0, count: 256)
    let rc = edgekey_tpm_key_from_file(tpm.raw, keyPath, nil, 0, &raw, &why, why.count)
    #expect(ResponseCode(rawValue: rc) == .authRequired)
    #expect(raw == nil)
    #expect(
      String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).contains("none was given"))
    #expect(tpm.commandCount == before)
    #expect(try tpm.info().lockoutCounter == 0)
  }

  @Test("concurrent signatures from many threads against one key all verify")
  func concurrentSignatures() async throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let tpm = try await TPM.open(tcti: swtpm.tcti)
    let key = try await tpm.loadKey(try tpm.createKey())
    let results = await withTaskGroup(of: (digest: [UInt8], signature: Signature?).self) { group in
      for _ in 0..<8 {
        group.addTask {
          // Each task signs several times through the async overload: on a thread of EdgeKey's
          // own pool, eight at once, none of them on the cooperative pool.
          var last: ([UInt8], Signature?) = ([], nil)
          for _ in 0..<10 {
            let digest = randomDigest(.sha256)
            last = (digest, try? await key.sign(digest: digest, hash: .sha256))
            if last.1 == nil { break }
          }
          return last
        }
      }
      var all: [(digest: [UInt8], signature: Signature?)] = []
      for await r in group { all.append(r) }
      return all
    }
    #expect(results.count == 8)
    for r in results {
      let signature = try #require(r.signature)
      #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: r.digest, signature: signature, in: dir))
    }
    #expect(key.loadCount == 1)
  }

  /// The fork runs in a process of its own (an exit test): in the test runner, dozens of other
  /// tests' threads are inside OpenSSL and the dynamic loader at any moment, and a child forked
  /// while one of them holds such a lock (OpenSSL 3 has no fork handlers) blocks on it forever.
  /// EdgeKey can make its own locks fork-safe, not other libraries'; POSIX allows a child of a
  /// multithreaded process only async-signal-safe calls. (It deadlocked in CI this way: a child
  /// of the 204-test runner, with no EdgeKey lock held, hit SIGALRM after 10 s.) What this test
  /// shows is that EdgeKey's TPM lock, held by another thread at fork, does not block the child.
  @Test(
    "a forked child re-creates the ESAPI context and signs, even when another thread held the TPM at fork",
    arguments: [0, 300])
  func forkedChildSigns(holdMilliseconds: Int32) async {
    await #expect(processExitsWith: .success) { [holdMilliseconds] in
      let swtpm = try SoftwareTPM()
      let dir = try scratchDirectory()
      let tpm = try TPM.open(tcti: swtpm.tcti)
      let key = try tpm.loadKey(try tpm.createKey())
      _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)  // loaded in the parent
      let digest = randomDigest(.sha256)
      var signature = [UInt8](repeating: 0, count: 256)
      var length = 0
      let status = edgekey_test_sign_in_child(
        key.raw, 0x0018 /* ECDSA */, 0x000B /* SHA-256 */, digest, digest.count, &signature, signature.count,
        &length, holdMilliseconds)
      #expect(status == 0, "child wait status \(status) (14 = SIGALRM: the child deadlocked)")
      let childSignature = Signature(bytes: Array(signature[..<length]), hash: .sha256, padding: nil)
      #expect(
        try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: childSignature, in: dir))
      // The parent's context and loaded key are untouched by the child.
      let after = randomDigest(.sha256)
      let parentSignature = try key.sign(digest: after, hash: .sha256)
      #expect(key.loadCount == 1)
      #expect(
        try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: after, signature: parentSignature, in: dir))
    }
  }

  @Test("one TPM context per TCTI per process")
  func oneContextPerTCTI() throws {
    let swtpm = try SoftwareTPM()
    let a = try TPM.open(tcti: swtpm.tcti)
    let b = try TPM.open(tcti: swtpm.tcti)
    #expect(a === b)
    #expect(a.isDirect)
  }

  @Test("the storage root key persists at 0x81000001 and matches tpm2-openssl's")
  func storageRootKeyPersists() throws {
    let swtpm = try SoftwareTPM()
    let dir = try scratchDirectory()
    let theirs = dir.appendingPathComponent("theirs.pem").path
    try swtpm.run(
      "openssl", ["genpkey", "-provider", "tpm2", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", theirs])
    let tpm = try TPM.open(tcti: swtpm.tcti)
    #expect(try tpm.persistStorageRootKey() == true)
    #expect(try tpm.persistStorageRootKey() == false)
    #expect(try tpm.persistentHandles().contains(.storageRootKey))
    // A key created under the transient primary loads under the persisted SRK: same key.
    let key = try tpm.loadKey(try TSS2PrivateKey(contentsOf: theirs))
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
  }

  @Test("diagnostics: identity, algorithms, curves, random, PCRs")
  func diagnostics() throws {
    let swtpm = try SoftwareTPM()
    let tpm = try TPM.open(tcti: swtpm.tcti)
    let info = try tpm.info()
    #expect(info.manufacturer == "IBM")
    #expect(info.curves.contains("nist_p256"))
    #expect(info.algorithms.contains("ecdsa"))
    #expect(Set(info.supportedKeys) == Set(KeyAlgorithm.allCases))
    #expect(info.transientSlots >= 3)
    #expect(!info.inLockout)
    #expect(info.hasResourceManager == false)
    let r1 = try tpm.randomBytes(100)
    let r2 = try tpm.randomBytes(100)
    #expect(r1.count == 100 && r2.count == 100 && r1 != r2)
    let pcrs = try tpm.readPCRs(bank: .sha256)
    #expect(pcrs.count == 24)
    #expect(pcrs.values.allSatisfy { $0.count == 32 })
    #expect(pcrs[0] == [UInt8](repeating: 0, count: 32))
  }
}

@Suite("TSS2 PRIVATE KEY files")
struct KeyFileTests {
  /// Written by tpm2-openssl 1.1.1 (`openssl genpkey -provider tpm2`): an independent fixture.
  static let tpm2OpensslKey = """
    -----BEGIN TSS2 PRIVATE KEY-----
    MIHwBgZngQUKAQOgAwEBAQIEQAAAAQRYAFYAIwALAAYAcgAAABAAEAADABAAIITl
    4IcW6GT+1X8drC2P4pA2stTmL2w/XbIApnR0nq6tACBY/Gk/RjJnHNLk0MCnVvz3
    xgbeACvMSMP4iFvo0+QvJgSBgAB+ACDOrU64dPh43qCVhLsFOlOaFXJF+IM2sOAh
    x50I9MUSPwAQvmzQCqCDuGK7qpM6mJxliK1L6vdtBbi/j+QaqGldiC2hWokIZaML
    9SwIRe8nHwh0WFfSVbD0DkAEH2tLKd+sO2mqi7JtVpMofWeLa93ompo2rXL973w0
    dAIn
    -----END TSS2 PRIVATE KEY-----

    """

  @Test("a tpm2-openssl key file decodes field by field and re-encodes to the same text")
  func decodesIndependentFixture() throws {
    let file = try TSS2PrivateKey(pem: Self.tpm2OpensslKey)
    #expect(file.parent == 0x4000_0001)
    #expect(file.emptyAuth)
    #expect(file.publicBlob.count == 88)
    #expect(file.privateBlob.count == 128)
    // tpm2-openssl encodes TRUE as 0x01; we write DER's 0xFF. Everything else is identical.
    var ours = file.der
    let theirs = try #require(Base64Fixture.decode(Self.tpm2OpensslKey))
    #expect(ours[15] == 0xFF && theirs[15] == 0x01)
    ours[15] = 0x01
    #expect(ours == theirs)
    #expect(try TSS2PrivateKey(der: theirs) == file)
    let publicKey = try file.publicKey()
    #expect(publicKey.algorithm == .eccP256)
    // tpm2-openssl makes sign|decrypt keys without noDA: exportable it is not, DA-protected it is.
    #expect(publicKey.attributes.isNonExportable)
    #expect(!publicKey.attributes.contains(.noDA))
  }

  @Test("malformed key files are refused with a typed error, never a crash")
  func malformedKeyFiles() throws {
    #expect(throws: TPMError.self) { try TSS2PrivateKey(pem: "not a key") }
    #expect(throws: TPMError.self) { try TSS2PrivateKey(der: [0x30, 0x03, 0x02, 0x01, 0x01]) }
    #expect(throws: TPMError.self) { try TSS2PrivateKey(der: []) }
    let good = try TSS2PrivateKey(pem: Self.tpm2OpensslKey)
    var der = good.der
    der.append(0)
    do {
      _ = try TSS2PrivateKey(der: der)
      Issue.record("accepted trailing bytes")
    } catch {
      #expect(error.code == .invalidKeyFile)
      #expect(error.reason.contains("trailing"))
    }
    for n in 0..<good.der.count {
      #expect(throws: TPMError.self) { try TSS2PrivateKey(der: Array(good.der.prefix(n))) }
    }
    // Flip each byte of the public blob's size field and of the OID: refused, not crashed.
    for i in 0..<20 {
      var bad = good.der
      bad[i] ^= 0xFF
      _ = try? TSS2PrivateKey(der: bad)
    }
    var sealed = good.der
    sealed[10] = 0x05  // 2.23.133.10.1.5: a sealed object, not a signing key
    do {
      _ = try TSS2PrivateKey(der: sealed)
      Issue.record("accepted a sealed-data object")
    } catch {
      #expect(error.reason.contains("not a loadable key"))
    }
  }

  @Test("PEM round trip keeps every field")
  func pemRoundTrip() throws {
    var file = try TSS2PrivateKey(pem: Self.tpm2OpensslKey)
    file.parent = 0x8100_0001
    file.emptyAuth = false
    let back = try TSS2PrivateKey(pem: file.pem)
    #expect(back == file)
    #expect(file.pem.hasPrefix("-----BEGIN TSS2 PRIVATE KEY-----\n"))
  }
}

enum Base64Fixture {
  static func decode(_ pem: String) -> [UInt8]? {
    let body = pem.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
    return Data(base64Encoded: body).map { [UInt8]($0) }
  }
}

@Suite("TPM layer through tpm2-abrmd (tabrmd TCTI)")
struct AccessBrokerTests {
  @Test("keys are created, persisted, loaded and sign through the resource manager")
  func signsThroughBroker() throws {
    let swtpm = try SoftwareTPM()
    let broker = try AccessBroker(over: swtpm)
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: broker.tcti)
    #expect(!tpm.isDirect)
    #expect(tpm.leakedObjectsFlushed == 0)
    let file = try tpm.createKey()
    let key = try tpm.loadKey(file)
    let digest = randomDigest(.sha256)
    let signature = try key.sign(digest: digest, hash: .sha256)
    #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
    let handle = PersistentHandle(rawValue: 0x8100_0030)!
    try tpm.persist(try tpm.createKey(.eccP384), at: handle)
    let persisted = try tpm.loadKey(at: handle)
    let digest384 = randomDigest(.sha384)
    let signature384 = try persisted.sign(digest: digest384, hash: .sha384)
    #expect(
      try verifyWithOpenSSL(publicKeyPEM: persisted.publicKey.pem, digest: digest384, signature: signature384, in: dir))
    // An independent reader sees the persisted key through the same broker.
    let readPublic = try broker.run("tpm2_readpublic", ["-c", String(format: "0x%08x", handle.rawValue)])
    #expect(readPublic.contains("fixedtpm"))
  }

  @Test("the broker virtualises the slots: other clients' objects do not evict our loaded key")
  func brokerVirtualisesSlots() throws {
    let swtpm = try SoftwareTPM()
    let broker = try AccessBroker(over: swtpm)
    let dir = try scratchDirectory()
    let tpm = try TPM.open(tcti: broker.tcti)
    let key = try tpm.loadKey(try tpm.createKey())
    try key.load()
    // Five primaries from other processes: on bare swtpm the third would fail with 0x902.
    for i in 0..<5 {
      try broker.run("tpm2_createprimary", ["-C", "o", "-c", "p\(i).ctx"], in: dir)
    }
    let digest = randomDigest(.sha256)
    let signature = try key.sign(digest: digest, hash: .sha256)
    #expect(key.loadCount == 1)
    #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
  }
}

@Suite("A TPM that hangs: every command bounded, recovery when it answers")
struct HungTPMTests {
  /// Signs until the hung TPM has been asked three times (each one a new connection), then
  /// once more after it answers again.
  func hangAndRecover(
    tcti: String, pause: () -> Void, resume: () -> Void, abandonedCommandsEndByThemselves: Bool = false
  ) throws {
    let tpm = try TPM.open(tcti: tcti)
    let key = try tpm.loadKey(try tpm.createKey())
    _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
    tpm.commandTimeout = .milliseconds(700)
    pause()
    var resumed = false
    defer { if !resumed { resume() } }
    for _ in 0..<3 {
      let error = try returnsWithin(.seconds(60)) { () -> TPMError? in
        do throws(TPMError) {
          _ = try key.sign(digest: randomDigest(.sha256), hash: .sha256)
          return nil
        } catch { return error }
      }
      let e = try #require(error, "signed with a TPM that answers nothing")
      #expect(e.code == .timeout || e.code == .unreachable, "\(e)")
      if e.code == .timeout { #expect(e.description.contains("did not answer in time")) }
    }
    // The Swift layer's own commands are bounded the same way.
    #expect(throws: TPMError.self) { try returnsWithin(.seconds(60)) { try tpm.info() } }
    if abandonedCommandsEndByThemselves {
      // A TCTI that honours the deadline it is given leaves no thread waiting on the TPM.
      while tpm.stuckCommands > 0 { usleep(10_000) }
    }
    resume()
    resumed = true
    tpm.commandTimeout = .seconds(10)
    let digest = randomDigest(.sha256)
    let signature = try key.sign(digest: digest, hash: .sha256)
    let dir = try scratchDirectory()
    #expect(try verifyWithOpenSSL(publicKeyPEM: key.publicKey.pem, digest: digest, signature: signature, in: dir))
    _ = try tpm.info()
  }

  @Test("swtpm stopped (SIGSTOP): each command ends in a typed timeout; nothing leaks once it runs again")
  func swtpmHangs() throws {
    let swtpm = try SoftwareTPM()
    try hangAndRecover(tcti: swtpm.tcti, pause: swtpm.pause, resume: swtpm.resume)
    // The commands of the abandoned connections ran late; what they loaded was flushed.
    let transients = try swtpm.run("tpm2_getcap", ["handles-transient"]).split(separator: "\n")
    #expect(transients.count <= 1, "\(transients)")
  }

  @Test("through tpm2-abrmd, with the swtpm behind it stopped")
  func brokerHangs() throws {
    let swtpm = try SoftwareTPM()
    let broker = try AccessBroker(over: swtpm)
    try hangAndRecover(tcti: broker.tcti, pause: swtpm.pause, resume: swtpm.resume)
  }

  @Test("through the device TCTI (a character device whose driver stops answering)")
  func deviceHangs() throws {
    let swtpm = try SoftwareTPM()
    let node = try DeviceNode(over: swtpm)
    defer { node.stop() }
    // The device's answers go to whichever descriptor reads first (a pseudo-terminal has one
    // stream, where /dev/tpmrm0 has one per open): the abandoned openings must be over first.
    try hangAndRecover(
      tcti: node.tcti, pause: node.pause, resume: node.resume, abandonedCommandsEndByThemselves: true)
  }
}
