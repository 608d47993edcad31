// Provisioning with key attestation against without, in one run, at the project's RA over
// loopback: each device on its own swtpm manufactured with an EK certificate (swtpm_setup with
// swtpm_localca, outside the timed part), enrolled by `RenewalAgent.renew()` with a one-time
// secret. With attestation: the EK certificate read, an attestation key created, the RA's
// credential challenge activated (EK re-created, policy session, TPM2_ActivateCredential), the
// AK certificate fetched, a nonce fetched, TPM2_Certify of the new key, the request with its
// evidence (verified by the RA). Then one rotation each: what attestation adds per rotation.
// TPM commands are counted at our TCTI.
import EdgeKeyCore
import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTPM
import EdgeKeyTestSupport
import Foundation

func runAttestation(_ options: Options, work: URL) throws {
  let manufacturer = try SoftwareTPM(endorsementCertificates: true)
  let ca = try TestCA()
  let ra = try RegistrationAuthority(ca: ca, password: nil, manufacturerCAs: [manufacturer.manufacturerCAPEM])
  let anchors = try Certificate.chain(pem: ca.certificatePEM)
  let count = max(options.devices, 3)
  struct Device {
    var swtpm: SoftwareTPM
    var tpm: TPM
    var agent: RenewalAgent
  }
  func device(_ id: String, attest: Bool) throws -> Device {
    let swtpm = try SoftwareTPM(endorsementCertificates: true, manufacturer: manufacturer)
    let tpm = try TPM.open(tcti: swtpm.tcti)
    try ra.importManifest([RegistrationAuthority.manifestLine(serial: id, name: id, secret: "secret-of-\(id)")])
    var policy = RenewalPolicy()
    policy.attest = attest
    let store = try CredentialStore(directory: swtpm.stateDirectory.appendingPathComponent("state").path)
    let settings = EnrollmentSettings(
      server: try ESTServer(url: ra.localhostURL), trustAnchors: anchors, password: (id, "secret-of-\(id)"))
    let agent = RenewalAgent(
      store: store, tpm: tpm, settings: settings, policy: policy, identity: (subject: [("CN", id)], names: []))
    return Device(swtpm: swtpm, tpm: tpm, agent: agent)
  }
  let clock = ContinuousClock()
  let seconds = { (d: Duration) in Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18 }
  var results: [Bool: (provision: [Double], commands: [Double], rotation: [Double], rotationCommands: [Double])] = [:]
  // Alternating, so that neither side gets the warmer machine.
  for i in 0..<count {
    for attest in [false, true] {
      let d = try device("bench-\(attest ? "a" : "p")-\(i)", attest: attest)
      let before = d.tpm.commandCount
      let provision = try clock.measure { try d.agent.renew() }
      let afterProvision = d.tpm.commandCount
      let rotation = try clock.measure { try d.agent.renew() }
      var r = results[attest] ?? ([], [], [], [])
      r.provision.append(seconds(provision))
      r.commands.append(Double(afterProvision - before))
      r.rotation.append(seconds(rotation))
      r.rotationCommands.append(Double(d.tpm.commandCount - afterProvision))
      results[attest] = r
    }
  }
  func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
  let with = results[true]!
  let without = results[false]!
  print(
    "attestation: \(count) devices each way; provisioning median \(Report.format(median(with.provision) * 1000)) ms "
      + "(\(Int(median(with.commands))) TPM commands) with, \(Report.format(median(without.provision) * 1000)) ms "
      + "(\(Int(median(without.commands)))) without; a rotation \(Int(median(with.rotationCommands))) commands with, "
      + "\(Int(median(without.rotationCommands))) without")
  Report.shared.add(
    "provisioning one device with attestation, median of \(count) (ms)", ours: median(with.provision) * 1000,
    anchorName: "without", anchor: median(without.provision) * 1000, unit: " ms", higherIsBetter: false)
  Report.shared.add(
    "TPM commands to provision one device with attestation", ours: median(with.commands), anchorName: "without",
    anchor: median(without.commands), unit: "", higherIsBetter: false)
  Report.shared.add(
    "one rotation with attestation (ms)", ours: median(with.rotation) * 1000, anchorName: "without",
    anchor: median(without.rotation) * 1000, unit: " ms", higherIsBetter: false)
  Report.shared.add(
    "TPM commands per rotation with attestation", ours: median(with.rotationCommands), anchorName: "without",
    anchor: median(without.rotationCommands), unit: "", higherIsBetter: false)
}
