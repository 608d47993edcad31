import CEdgeKeyHTTP
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyRA
import EdgeKeyTLS
import EdgeKeyTPM

/// One fuzz target per parser of outside input. Each takes arbitrary bytes and must return
/// normally: a parser error is the expected answer to garbage; a crash, a sanitizer report or a
/// failed `check` (a broken round trip) is a finding.
///
/// `edgekey-fuzz` runs them under libFuzzer (`scripts/fuzz`); the test suite replays the corpus
/// in `Tests/Fuzz/Corpus/<target>/` through the same functions.
public enum FuzzTargets {
  public static let all: [String: @Sendable ([UInt8]) -> Void] = [
    "pem-chain": pemChain,
    "der-certificate": derCertificate,
    "est-pkcs7": estPKCS7,
    "est-csrattrs": estCSRAttributes,
    "http-response": httpResponse,
    "http-request": httpRequest,
    "csr": signingRequest,
    "tss2-keyfile": keyFile,
    "tpm-public": tpmPublic,
    "csr-attestation": csrAttestation,
    "credential": credential,
    "config": config,
  ]

  public static var names: [String] { all.keys.sorted() }

  /// PEM certificates and chains (trust anchors, stored chains, `--cafile`).
  static func pemChain(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    _ = PEM.decode(text, label: "CERTIFICATE")
    if let chain = try? Certificate.chain(pem: text) { chain.forEach(touch) }
    if let one = try? Certificate(pem: text) { touch(one) }
  }

  /// One DER certificate; its encoding must parse back to the same certificate.
  static func derCertificate(_ bytes: [UInt8]) {
    guard let certificate = try? Certificate(der: bytes) else { return }
    touch(certificate)
    let again = try? Certificate(der: certificate.der)
    check(again?.fingerprint == certificate.fingerprint, "DER round trip changed the certificate")
  }

  /// An EST cacerts or simpleenroll body: base64, PEM or DER, then certs-only PKCS#7.
  static func estPKCS7(_ bytes: [UInt8]) {
    let der = ESTBody.decode(bytes) ?? bytes
    guard let certificates = try? CertsOnlyPKCS7.decode(der) else { return }
    certificates.forEach(touch)
    if let encoded = try? CertsOnlyPKCS7.encode(certificates) {
      let again = try? CertsOnlyPKCS7.decode(encoded)
      check(again?.map(\.fingerprint) == certificates.map(\.fingerprint), "PKCS#7 round trip lost certificates")
    }
  }

  /// An EST csrattrs body.
  static func estCSRAttributes(_ bytes: [UInt8]) {
    let der = ESTBody.decode(bytes) ?? bytes
    _ = ESTBody.objectIdentifiers(in: der)
    _ = try? CSRAttributes(der: der)
  }

  /// What the EST server sends besides the PKCS#7: header lines (the C reader libcurl feeds),
  /// Retry-After values and error bodies.
  static func httpResponse(_ bytes: [UInt8]) {
    var response = edgekey_http_response()
    for line in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
      line.withUnsafeBufferPointer { buffer in
        buffer.withMemoryRebound(to: CChar.self) { edgekey_http_header_line(&response, $0.baseAddress, $0.count) }
      }
      check(
        withUnsafeBytes(of: response.content_type) { $0.contains(0) }
          && withUnsafeBytes(of: response.retry_after) { $0.contains(0) }
          && withUnsafeBytes(of: response.location) { $0.contains(0) }, "a header field lost its terminator")
    }
    let retryAfter = withUnsafeBytes(of: response.retry_after) {
      String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
    }
    if let wait = ESTBody.retryAfter(retryAfter) { check(wait >= 0, "a negative Retry-After") }
    let message = ESTBody.message(bytes)
    check(!message.contains("\n") && message.count <= 401, "an error message that is not one bounded line")
  }

  /// What a client sends the registration authority: the request head, Basic credentials, a
  /// base64 CSR.
  static func httpRequest(_ bytes: [UInt8]) {
    let end = bytes.firstRange(of: [13, 10, 13, 10])?.lowerBound ?? bytes.count
    guard let head = try? HTTPRequestHead(parsing: bytes[0..<end]) else { return }
    check(head.contentLength >= 0 && head.path.hasPrefix("/"), "a head that should have been refused")
    let authorization = head.headers.first { $0.name == "authorization" }?.value
    _ = ESTService.basicCredentials(authorization)
    if end + 4 <= bytes.count, let der = ESTService.decodeBase64(Array(bytes[(end + 4)...])) {
      signingRequest(der)
    }
  }

  /// A PKCS#10 request (the RA's input).
  static func signingRequest(_ bytes: [UInt8]) {
    guard let request = try? CertificateSigningRequest(der: bytes) else { return }
    _ = request.subject
    _ = request.subjectFields
    _ = request.publicKeyDER
    _ = request.keyType
    _ = request.subjectAlternativeNames.map(\.description)
    _ = request.challengePassword
    _ = request.pem
  }

  /// A TSS2 PRIVATE KEY file, DER or PEM; a decoded key re-encodes to itself.
  static func keyFile(_ bytes: [UInt8]) {
    let key: TSS2PrivateKey?
    if bytes.first == 0x30 {
      key = try? TSS2PrivateKey(der: bytes)
    } else {
      key = try? TSS2PrivateKey(pem: String(decoding: bytes, as: UTF8.self))
    }
    guard let key else { return }
    check((try? TSS2PrivateKey(der: key.der)) == key, "key file round trip changed the key")
    check((try? TSS2PrivateKey(pem: key.pem)) == key, "key file PEM round trip changed the key")
    if let publicKey = try? key.publicKey() { touch(publicKey) }
  }

  /// A marshaled TPM2B_PUBLIC (the public half inside a key file).
  static func tpmPublic(_ bytes: [UInt8]) {
    if let publicKey = try? PublicKey(marshaledPublic: bytes) { touch(publicKey) }
  }

  /// A CSR's id-aa-attestation bundle (draft-ietf-lamps-csr-attestation) and the TPM structures
  /// in its tcg-attest-tpm-certify statement, as the RA reads them from any client.
  static func csrAttestation(_ bytes: [UInt8]) {
    guard let attestation = try? KeyAttestation(bundle: bytes) else { return }
    let again = try? KeyAttestation(bundle: attestation.der)
    check(again == attestation, "attestation bundle round trip changed it")
    let evidence = attestation.evidence
    _ = try? EvidenceVerifier.certifyInfo(evidence.attest)
    _ = try? EvidenceVerifier.verifySignature(evidence.signature, over: evidence.attest, by: [])
    if let key = try? PublicKey(publicArea: evidence.certifiedPublicArea) {
      touch(key)
      _ = key.name
    }
    for der in attestation.certificates { if let c = try? Certificate(der: der) { touch(c) } }
  }

  /// A credential file of the state directory (key block and chain).
  static func credential(_ bytes: [UInt8]) {
    guard let credential = try? Credential(pem: String(decoding: bytes, as: UTF8.self), origin: "fuzz") else {
      return
    }
    credential.chain.forEach(touch)
    _ = credential.pem
  }

  /// `edgekey --config` files; what parses renders back to the same entries.
  static func config(_ bytes: [UInt8]) {
    guard let file = try? ConfigFile(parsing: bytes, origin: "fuzz") else { return }
    let again = try? ConfigFile(parsing: Array(file.text.utf8), origin: "fuzz")
    check(
      again?.entries.map { [$0.key, $0.value] } == file.entries.map { [$0.key, $0.value] },
      "config round trip changed the entries")
  }

  static func touch(_ c: Certificate) {
    _ = (c.subject, c.issuer, c.subjectFields, c.commonName, c.serialNumber, c.notBefore, c.notAfter)
    _ = (c.subjectAlternativeNames.map(\.description), c.extendedKeyUsage, c.allowsClientAuth, c.isCA)
    _ = (c.isSelfSigned, c.publicKeyDER, c.keyType, c.fingerprint, c.description, c.pem)
  }

  static func touch(_ key: PublicKey) {
    _ = (key.algorithm, key.fingerprint, key.attributes.description, key.pem, key.spki)
  }

  static func check(_ condition: Bool, _ what: String) {
    if !condition { fatalError("fuzz invariant broken: \(what)") }
  }
}
