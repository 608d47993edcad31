import EdgeKey
import EdgeKeyEnrollment
import EdgeKeyMQTT
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation
import Testing

/// The facade's one error family: the code and layer each failure maps to, whether it is worth
/// retrying, the underlying error kept whole, equality by code.
@Suite("EdgeKeyError: one family for TPM, TLS, MQTT, EST and the store")
struct ErrorFamilyTests {
  @Test("each layer's failures map to their code and layer, transient or not, the original kept")
  func mapping() throws {
    let cases: [(any Error, EdgeKeyError.Code, EdgeKeyError.Layer, Bool)] = [
      (TPMError(.busy, reason: "self test"), .tpmBusy, .tpm, true),
      (TPMError(.objectSlotsFull, reason: "full"), .tpmBusy, .tpm, true),
      (TPMError(.timeout, reason: "hung"), .tpmTimeout, .tpm, true),
      (TPMError(.lockout, reason: "DA"), .tpmLockout, .tpm, false),
      (TPMError(.unreachable, reason: "none"), .tpmUnreachable, .tpm, false),
      // The TPM's error inside an enrollment step is still the TPM's.
      (EnrollmentError(.tpm, "creating the key", tpm: TPMError(.busy, reason: "busy")), .tpmBusy, .tpm, true),
      (EnrollmentError(.tpm, "creating the key", tpm: TPMError(.lockout, reason: "DA")), .tpmLockout, .tpm, false),
      (EnrollmentError(.server(403), "not your name"), .enrollmentRefused, .enrollment, false),
      (EnrollmentError(.server(503), "later"), .enrollmentUnavailable, .enrollment, true),
      (EnrollmentError(.network, "reset"), .enrollmentUnavailable, .enrollment, true),
      (EnrollmentError(.credentialLost, "TPM cleared"), .credentialLost, .tpm, false),
      (EnrollmentError(.cancelled, "stopped"), .cancelled, .caller, false),
      (MQTTError(kind: .connectionRefused(5), reason: "not authorized"), .brokerRefused, .mqtt, false),
      (MQTTError(kind: .connectionFailed(7), reason: "lost"), .brokerUnreachable, .mqtt, true),
      (MQTTError(kind: .outboxFull, reason: "full"), .outboxFull, .mqtt, true),
      (TLSError(.network, .other, "reset by peer"), .tlsNetwork, .tls, true),
      (TLSError(.serverCertificate, .certificateExpired, "expired"), .certificateRefused, .tls, false),
      (CancellationError(), .cancelled, .caller, false),
    ]
    for (original, code, layer, transient) in cases {
      let e = EdgeKeyError(original)
      #expect(e.code == code, "\(original) → \(e)")
      #expect(e.layer == layer, "\(original) → \(e)")
      #expect(e.isTransient == transient, "\(original) → \(e)")
      #expect(e.underlying != nil || original is CancellationError, "\(original): the original is kept")
    }
    // The TPM error inside the enrollment error is the one kept, whole.
    let nested = EdgeKeyError(EnrollmentError(.tpm, "signing", tpm: TPMError(.lockout, reason: "DA")))
    #expect((nested.underlying as? TPMError)?.code == .lockout)
    // EnrollmentError's own view agrees: a busy TPM is worth retrying, a lockout is not.
    #expect(EnrollmentError(.tpm, "x", tpm: TPMError(.busy, reason: "")).isTransient)
    #expect(!EnrollmentError(.tpm, "x", tpm: TPMError(.lockout, reason: "")).isTransient)
    // Equal by code, whatever the text says.
    #expect(EdgeKeyError(.tpmBusy, layer: .tpm, reason: "a") == EdgeKeyError(.tpmBusy, layer: .tpm, reason: "b"))
    #expect(MQTTError(kind: .timedOut, reason: "after 1 s") == MQTTError(kind: .timedOut, reason: "after 2 s"))
    #expect(EnrollmentError(.network, "a") == EnrollmentError(.network, "b"))
    #expect(TLSError(.network, .other, "a") == TLSError(.network, .other, "b"))
  }

  @Test("a device whose TPM does not answer: Device.open throws tpmUnreachable from the TPM layer")
  func unreachableTPM() async throws {
    let state = temporaryPath("facade-state")
    var configuration = DeviceConfiguration(
      stateDirectory: state, enrollmentServer: "https://127.0.0.1:1", trustAnchors: [],
      broker: MQTTEndpoint(host: "127.0.0.1", port: 1))
    // A port nothing listens on (swtpm's TCTI connects, is refused).
    configuration.tcti = "swtpm:host=127.0.0.1,port=1"
    do {
      _ = try await Device.open(configuration)
      Issue.record("opened a device without a TPM")
    } catch {
      #expect(error.code == .tpmUnreachable, "\(error)")
      #expect(error.layer == .tpm)
      #expect(!error.isTransient)
    }
  }
}
