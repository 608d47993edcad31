import EdgeKeyTLS
import FoundationEssentials

/// What a device checks before it installs a certificate an enrollment server issued. Servers
/// are known to drop SANs, change the subject or answer with someone else's certificate.
enum IssuedCertificateCheck {
  /// Picks our certificate out of the bag by public key and checks it; returns the chain our
  /// certificate first, intermediates after (the anchor stays in the trust store).
  static func validate(
    _ bag: [Certificate], for csr: CertificateSigningRequest, anchors: [Certificate], at now: Date,
    clockSkew: Duration
  ) throws(EnrollmentError) -> [Certificate] {
    let ours = csr.publicKeyDER
    guard let leaf = bag.first(where: { $0.publicKeyDER == ours }) else {
      throw EnrollmentError(
        .certificateRefused,
        "the server returned no certificate for our key (it sent \(bag.map(\.subject).joined(separator: ", ")))",
        certificate: bag.first?.summary)
    }
    func refuse(_ why: String) -> EnrollmentError {
      EnrollmentError(.certificateRefused, why, certificate: leaf.summary)
    }
    guard leaf.subject == csr.subject else {
      throw refuse("the server changed the subject from \(csr.subject) to \(leaf.subject)")
    }
    let missing = Set(csr.subjectAlternativeNames).subtracting(leaf.subjectAlternativeNames)
    guard missing.isEmpty else {
      throw refuse(
        "the server dropped subject alternative names: \(missing.map(\.description).sorted().joined(separator: ", "))")
    }
    guard leaf.allowsClientAuth else { throw refuse("the certificate does not allow clientAuth") }
    guard !leaf.isCA else { throw refuse("the certificate is a CA certificate") }
    guard leaf.notAfter > now else { throw refuse("the certificate is already expired") }
    guard leaf.notBefore <= now.addingTimeInterval(clockSkew.seconds) else {
      throw refuse("the certificate is not valid before \(leaf.summary.notBefore) (check our clock and the CA's)")
    }
    do {
      // Verified at a time inside its validity, so that a small skew does not refuse it.
      let at = max(now, leaf.notBefore)
      return try Certificate.verifiedChain(
        leaf: leaf, untrusted: bag.filter { $0.der != leaf.der }, anchors: anchors, purpose: .clientAuth, at: at)
    } catch {
      throw refuse("the certificate does not chain to our trust anchor: \(error.reason)")
    }
  }
}
