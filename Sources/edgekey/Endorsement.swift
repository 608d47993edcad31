import EdgeKeyCore
import EdgeKeyTLS
import EdgeKeyTPM

/// What `tpm info` says of each endorsement key: its manufacturer certificate and whether the
/// EK re-created from the default template is the certificate's key.
struct EndorsementReport {
  var type: EndorsementKeyType
  var certificate: Certificate?
  /// nil when there is no certificate to compare with, or the EK could not be re-created.
  var matchesKey: Bool?
  var problem: String?

  static func read(_ tpm: TPM) -> [EndorsementReport] {
    EndorsementKeyType.allCases.compactMap { type -> EndorsementReport? in
      let der: [UInt8]?
      do { der = try tpm.endorsementCertificate(type) } catch {
        return EndorsementReport(
          type: type, problem: "cannot read 0x\(String(type.certificateIndex, radix: 16)): \(error)")
      }
      guard let der else { return nil }
      let certificate: Certificate
      do throws(TLSError) { certificate = try Certificate(der: der) } catch {
        return EndorsementReport(
          type: type, problem: "0x\(String(type.certificateIndex, radix: 16)) is not a certificate: \(error.reason)")
      }
      do {
        let key = try tpm.endorsementKey(type)
        return EndorsementReport(type: type, certificate: certificate, matchesKey: key.spki == certificate.publicKeyDER)
      } catch {
        return EndorsementReport(type: type, certificate: certificate, problem: "the EK cannot be re-created: \(error)")
      }
    }
  }

  /// The TPM the certificate names (TCG EK Credential Profile: manufacturer, model and version
  /// in the subject alternative name's directory name), e.g. "id:00001014 swtpm id:20191023".
  var tpmNamed: String? {
    let attributes = certificate?.directoryNameAttributes ?? []
    let wanted = ["2.23.133.2.1", "2.23.133.2.2", "2.23.133.2.3"]
    let values = wanted.compactMap { oid in attributes.first { $0.oid == oid }?.value }
    return values.isEmpty ? nil : values.joined(separator: " ")
  }

  var text: String {
    let index = "0x" + String(type.certificateIndex, radix: 16)
    guard let certificate else { return "\(type.rawValue) at \(index): \(problem ?? "?")" }
    var line =
      "\(type.rawValue) at \(index): issuer \(certificate.issuer), valid \(Certificate.format(certificate.notBefore)) to \(Certificate.format(certificate.notAfter))"
    if let tpmNamed { line += ", for TPM \(tpmNamed)" }
    switch matchesKey {
    case true?: line += "; the re-created EK is its key"
    case false?: line += "; the re-created EK is NOT its key (another template, or a replaced certificate)"
    case nil: line += "; \(problem ?? "")"
    }
    return line
  }

  var json: String {
    var fields = [
      "\"type\":\(jsonString(type.rawValue))",
      "\"index\":\(jsonString("0x" + String(type.certificateIndex, radix: 16)))",
    ]
    if let certificate {
      fields += [
        "\"subject\":\(jsonString(certificate.subject))", "\"issuer\":\(jsonString(certificate.issuer))",
        "\"notBefore\":\(jsonString(Certificate.format(certificate.notBefore)))",
        "\"notAfter\":\(jsonString(Certificate.format(certificate.notAfter)))",
      ]
      if let tpmNamed { fields.append("\"tpm\":\(jsonString(tpmNamed))") }
    }
    if let matchesKey { fields.append("\"matchesKey\":\(matchesKey)") }
    if let problem { fields.append("\"problem\":\(jsonString(problem))") }
    return "{" + fields.joined(separator: ",") + "}"
  }
}
