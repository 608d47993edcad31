import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM

/// A TPM key reference (the TSS2 key file: blobs wrapped by the TPM, useless without it) and
/// the certificate chain issued for it, our certificate first. A pending credential has a key
/// and no chain yet.
///
/// On disk it is one PEM file, the key block then the certificates, so that one atomic rename
/// switches key and certificate together; tpm2-openssl and OpenSSL's tools read the same file.
public struct Credential: Sendable {
  /// The TPM key (a TSS2 PRIVATE KEY file: loadable only by the TPM that made it).
  public let key: TSS2PrivateKey
  /// The certificate chain, leaf first; empty while only the key exists.
  public let chain: [Certificate]

  /// A credential of `key` and `chain`.
  public init(key: TSS2PrivateKey, chain: [Certificate] = []) {
    self.key = key
    self.chain = chain
  }

  /// Our certificate, if issued.
  public var certificate: Certificate? { chain.first }
  /// True when it has a certificate.
  public var isComplete: Bool { !chain.isEmpty }

  /// The key file followed by the chain, as stored.
  public var pem: String { key.pem + chain.map(\.pem).joined() }

  /// Parses and checks a stored credential: a TSS2 key block, then any certificates, the first
  /// of which must be for that key.
  public init(pem: String, origin: String) throws(EnrollmentError) {
    do {
      key = try TSS2PrivateKey(pem: pem)
    } catch {
      throw EnrollmentError(.storage, "\(origin): \(error)")
    }
    if pem.contains("-----BEGIN CERTIFICATE-----") {
      do {
        chain = try Certificate.chain(pem: pem)
      } catch {
        throw EnrollmentError(.storage, "\(origin): \(error.reason)")
      }
    } else {
      chain = []
    }
    if let leaf = chain.first {
      let spki: [UInt8]
      do { spki = try key.publicKey().spki } catch {
        throw EnrollmentError(.storage, "\(origin): the key's public area cannot be read: \(error)")
      }
      guard leaf.publicKeyDER == spki else {
        throw EnrollmentError(
          .storage, "\(origin): the certificate is not for the key stored with it", certificate: leaf.summary)
      }
    }
  }
}

/// What an enrollment or renewal installed: the stored credential and its key, loaded in the
/// TPM and ready to sign (for a `TLSClientContext`), so the caller need not load it again.
/// The credential's properties read through (`renewed.certificate`, `renewed.chain`).
@dynamicMemberLookup
public struct InstalledCredential: Sendable {
  /// The credential as stored in the `current` slot.
  public let credential: Credential
  /// Its key, loaded in the TPM.
  public let key: TPMKey

  /// The installed `credential` with its loaded `key`.
  public init(credential: Credential, key: TPMKey) {
    self.credential = credential
    self.key = key
  }

  /// A property of the credential.
  public subscript<T>(dynamicMember path: KeyPath<Credential, T>) -> T { credential[keyPath: path] }
}
