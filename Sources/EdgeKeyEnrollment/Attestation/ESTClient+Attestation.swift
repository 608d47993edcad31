import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM
import FoundationEssentials

/// A credential challenge from the RA (`attest-activate`).
public struct ActivationChallenge: Sendable {
  /// The RA's name for it, sent back with the answer.
  public var id: String
  /// The credential, sealed to the EK and bound to the AK's name, for TPM2_ActivateCredential.
  public var challenge: CredentialChallenge
  /// The EK the challenge is sealed to.
  public var endorsementKey: EndorsementKeyType
}

extension ESTClient {
  /// `POST nonce`: a fresh, single-use nonce for TPM2_Certify, bound to `authentication`.
  public func attestationNonce(authentication: ESTAuthentication) throws(EnrollmentError) -> [UInt8] {
    struct Answer: Decodable { var nonce: String }
    let answer = try post("nonce", [:], as: Answer.self, authentication: authentication)
    guard let nonce = Base64.decode(answer.nonce), (16...64).contains(nonce.count) else {
      throw EnrollmentError(.malformedResponse, "nonce: no base64 nonce of 16 to 64 bytes in the answer")
    }
    return nonce
  }

  /// `POST attest-activate`: sends the EK certificate and the AK's public area; the RA answers
  /// a credential challenge sealed to that EK for that AK's Name.
  public func activationChallenge(
    endorsementCertificate: [UInt8], attestationKey: PublicKey, authentication: ESTAuthentication
  ) throws(EnrollmentError) -> ActivationChallenge {
    struct Answer: Decodable {
      var id: String
      var credentialBlob: String
      var encryptedSecret: String
      var endorsementKey: String
    }
    let object = try post(
      "attest-activate",
      [
        "ekCertificate": Base64.encode(endorsementCertificate),
        "attestationKey": Base64.encode(attestationKey.tpmPublic),
      ], as: Answer.self, authentication: authentication)
    let id = object.id
    guard !id.isEmpty, let blob = Base64.decode(object.credentialBlob),
      let secret = Base64.decode(object.encryptedSecret),
      let type = EndorsementKeyType(rawValue: object.endorsementKey)
    else {
      throw EnrollmentError(.malformedResponse, "attest-activate: the answer is not a credential challenge")
    }
    return ActivationChallenge(
      id: id, challenge: CredentialChallenge(credentialBlob: blob, encryptedSecret: secret), endorsementKey: type)
  }

  /// `POST attest-akcert`: the credential the TPM released; the RA answers the AK's certificate
  /// chain, which is checked to be for `attestationKey` and to chain to our trust anchors.
  public func attestationKeyCertificate(
    challengeID: String, credential: [UInt8], attestationKey: PublicKey, authentication: ESTAuthentication
  ) throws(EnrollmentError) -> [Certificate] {
    let answer = try ESTClient.perform(
      server: server, options: options, method: "POST", operation: "attest-akcert",
      body: Array(Self.jsonObject(["id": challengeID, "credential": Base64.encode(credential)]).utf8),
      contentType: "application/json", authentication: authentication, trustAnchorsPEM: trustAnchors.map(\.pem).joined()
    )
    let chain: [Certificate]
    do { chain = try Certificate.chain(pem: String(decoding: answer.body, as: UTF8.self)) } catch {
      throw EnrollmentError(.malformedResponse, "attest-akcert: the answer is not a PEM certificate chain")
    }
    guard let first = chain.first, first.publicKeyDER == attestationKey.spki else {
      throw EnrollmentError(.certificateRefused, "attest-akcert: the certificate is not for our attestation key")
    }
    do {
      _ = try Certificate.verifiedChain(
        leaf: first, untrusted: Array(chain.dropFirst()), anchors: trustAnchors, purpose: .any)
    } catch {
      throw EnrollmentError(
        .certificateRefused, "attest-akcert: the AK certificate does not chain to our anchors: \(error.reason)")
    }
    return chain
  }

  private func post<T: Decodable>(
    _ operation: String, _ fields: [String: String], as type: T.Type, authentication: ESTAuthentication
  ) throws(EnrollmentError) -> T {
    let answer = try ESTClient.perform(
      server: server, options: options, method: "POST", operation: operation,
      body: Array(Self.jsonObject(fields).utf8), contentType: "application/json", authentication: authentication,
      trustAnchorsPEM: trustAnchors.map(\.pem).joined())
    do { return try JSONDecoder().decode(T.self, from: Data(answer.body)) } catch {
      throw EnrollmentError(.malformedResponse, "\(operation): the answer is not the JSON object expected")
    }
  }

  static func jsonObject(_ fields: [String: String]) -> String {
    "{"
      + fields.sorted { $0.key < $1.key }.map { "\(JSON.string($0.key)):\(JSON.string($0.value))" }.joined(
        separator: ",")
      + "}"
  }
}
