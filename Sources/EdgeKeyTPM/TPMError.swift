internal import CEdgeKeyProvider
internal import CTSS2

/// A TSS2 response code: from the TPM itself, or from a layer of the TSS (ESAPI, TCTI).
///
/// Compare with the named codes, or match them in a `catch` (`case ResponseCode.lockout`); a
/// format-one code matches its base whatever the handle, parameter or session number.
public struct ResponseCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
  public var rawValue: UInt32
  public init(rawValue: UInt32) { self.rawValue = rawValue }

  /// The layer that produced the code (0 for the TPM, 7 ESAPI, 10 TCTI, 12 EdgeKey).
  public var layer: UInt32 { (rawValue >> 16) & 0xFF }
  /// The code without the handle, parameter or session number of a format-one TPM error.
  public var base: ResponseCode { ResponseCode(rawValue: edgekey_rc_base_public(rawValue)) }
  /// The TSS's decoding, e.g. "tpm:warn(2.0): out of memory for object contexts".
  public var decoded: String {
    // EdgeKey's own layer is named by a decoder the first TPM open installs; installed here too,
    // so that a code decodes the same before any TPM was opened.
    edgekey_install_process_hooks()
    return String(cString: Tss2_RC_Decode(rawValue))
  }
  public var description: String { "0x\(String(rawValue, radix: 16, uppercase: true)) (\(decoded))" }

  /// Matches a code, or its base: `case .lockout:` matches a lockout from any layer.
  public static func ~= (pattern: ResponseCode, value: ResponseCode) -> Bool {
    pattern.rawValue == value.rawValue || pattern.rawValue == value.base.rawValue
  }

  /// TPM_RC_SUCCESS.
  public static let success = ResponseCode(rawValue: 0)
  /// TPM_RC_INITIALIZE: TPM2_Startup has not run.
  public static let initialize = ResponseCode(rawValue: 0x100)
  /// TPM_RC_FAILURE: the TPM is in failure mode.
  public static let failure = ResponseCode(rawValue: 0x101)
  /// TPM_RC_NV_DEFINED: the NV index exists.
  public static let nvDefined = ResponseCode(rawValue: 0x14C)
  /// TPM_RC_ASYMMETRIC: the key type is not supported here.
  public static let asymmetric = ResponseCode(rawValue: 0x081)
  /// TPM_RC_ATTRIBUTES: the object's attributes do not allow this.
  public static let attributes = ResponseCode(rawValue: 0x082)
  /// TPM_RC_HASH: the hash algorithm is not supported or not allowed.
  public static let hash = ResponseCode(rawValue: 0x083)
  /// TPM_RC_VALUE: a value is out of range.
  public static let value = ResponseCode(rawValue: 0x084)
  /// TPM_RC_KEY_SIZE: the key size is not supported.
  public static let keySize = ResponseCode(rawValue: 0x087)
  /// TPM_RC_HANDLE: the handle is not loaded or not valid.
  public static let handle = ResponseCode(rawValue: 0x08B)
  /// TPM_RC_AUTH_FAIL: the authorization failed (counts towards lockout).
  public static let authFail = ResponseCode(rawValue: 0x08E)
  /// TPM_RC_SCHEME: the signing scheme is not supported.
  public static let scheme = ResponseCode(rawValue: 0x092)
  /// TPM_RC_SIZE: a structure has the wrong size.
  public static let size = ResponseCode(rawValue: 0x095)
  /// TPM_RC_INTEGRITY: a blob failed its integrity check (another TPM's, or tampered).
  public static let integrity = ResponseCode(rawValue: 0x09F)
  /// TPM_RC_BAD_AUTH: the authorization is wrong (not counted towards lockout).
  public static let badAuth = ResponseCode(rawValue: 0x0A2)
  /// TPM_RC_CURVE: the curve is not supported.
  public static let curve = ResponseCode(rawValue: 0x0A6)
  /// TPM_RC_OBJECT_MEMORY: no free object slot.
  public static let objectMemory = ResponseCode(rawValue: 0x902)
  /// TPM_RC_SESSION_MEMORY: no free session slot.
  public static let sessionMemory = ResponseCode(rawValue: 0x903)
  /// TPM_RC_YIELDED: the TPM paused the command; send it again.
  public static let yielded = ResponseCode(rawValue: 0x908)
  /// TPM_RC_CANCELED: the command was cancelled.
  public static let canceled = ResponseCode(rawValue: 0x909)
  /// TPM_RC_TESTING: the TPM is running its self tests.
  public static let testing = ResponseCode(rawValue: 0x90A)
  /// TPM_RC_REFERENCE_H0: the first handle refers to an object not loaded.
  public static let referenceH0 = ResponseCode(rawValue: 0x910)
  /// TPM_RC_LOCKOUT: dictionary-attack lockout.
  public static let lockout = ResponseCode(rawValue: 0x921)
  /// TPM_RC_RETRY: the TPM is busy; try again.
  public static let retry = ResponseCode(rawValue: 0x922)
  /// EdgeKey: no TCTI answered.
  public static let noTPM = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 1)
  /// EdgeKey: the key file cannot be read.
  public static let badKeyFile = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 2)
  /// EdgeKey: an argument the TPM layer cannot use.
  public static let badArgument = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 3)
  /// EdgeKey: the key file's parent is not this TPM's storage root key.
  public static let srkMismatch = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 5)
  /// EdgeKey: the key cannot sign.
  public static let notASigningKey = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 6)
  /// EdgeKey: the key needs an authorization value.
  public static let authRequired = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 7)
  /// EdgeKey: the TPM did not answer within the command timeout.
  public static let timeout = ResponseCode(rawValue: EDGEKEY_RC_LAYER_VALUE | 8)
}

let EDGEKEY_RC_LAYER_VALUE: UInt32 = 12 << 16

/// What went wrong in the TPM layer, for code (``code``) and for people (``description``).
///
/// Equal when the code and the response code are equal.
public struct TPMError: Error, Sendable, Equatable, CustomStringConvertible {
  /// The kind of failure: extensible, matched in `catch` clauses.
  public struct Code: Hashable, Sendable, CustomStringConvertible {
    /// The code's name, as errors and metrics show it.
    public var name: String
    /// A code named `name` (codes compare by name).
    public init(_ name: String) { self.name = name }
    public var description: String { name }

    /// No TPM answered on any TCTI tried (``TPMError/reason`` lists them).
    public static let unreachable = Code("unreachable")
    /// Dictionary-attack lockout: too many wrong auth values for DA-protected objects.
    public static let lockout = Code("lockout")
    /// A wrong auth value for the key or hierarchy.
    public static let authFailed = Code("authFailed")
    /// The key has a password and none was given; refused before the TPM was asked.
    public static let authRequired = Code("authRequired")
    /// All transient object slots are in use (3 on swtpm without a resource manager).
    public static let objectSlotsFull = Code("objectSlotsFull")
    /// No object at the handle, or the key's parent (SRK) is not the one it was created under.
    public static let keyNotFound = Code("keyNotFound")
    /// A persistent handle that is already taken.
    public static let handleInUse = Code("handleInUse")
    /// The TPM does not support the algorithm, curve or key size.
    public static let unsupported = Code("unsupported")
    /// A key file that is not a loadable TSS2 PRIVATE KEY.
    public static let invalidKeyFile = Code("invalidKeyFile")
    /// 0x81000001 holds a key that is not the standard storage root key.
    public static let srkMismatch = Code("srkMismatch")
    /// The TPM is busy (self test, yielded, retry): the same call may succeed later.
    public static let busy = Code("busy")
    /// The TPM did not answer within the command timeout (``TPM/commandTimeout``). The context
    /// was discarded; the next call reaches for the TPM again.
    public static let timeout = Code("timeout")
    /// TPM2_ActivateCredential refused the challenge: it was not made for this attestation
    /// key's Name and this TPM's endorsement key (or it was altered on the way).
    public static let credentialRejected = Code("credentialRejected")
    /// A caller error caught before the TPM was asked.
    public static let invalidArgument = Code("invalidArgument")
    /// Anything else the TPM or the TSS reported (see ``TPMError/responseCode``).
    public static let tpmFailure = Code("tpmFailure")
  }

  /// What kind of failure, for code that reacts (retry, reprovision, stop).
  public var code: Code
  /// The TSS2 response code, when one was returned.
  public var responseCode: ResponseCode?
  /// The TPM command (or TSS step) that failed, e.g. "TPM2_Sign".
  public var command: String?
  /// A sentence for people: what failed and what to do about it.
  public var reason: String
  /// Where in EdgeKey it was thrown.
  public var file: String
  /// The line it was thrown at.
  public var line: Int

  /// An error of `code`; `command` names the TPM command that failed.
  public init(
    _ code: Code, responseCode: ResponseCode? = nil, command: String? = nil, reason: String,
    file: String = #fileID, line: Int = #line
  ) {
    self.code = code
    self.responseCode = responseCode
    self.command = command
    self.reason = reason
    self.file = file
    self.line = line
  }

  /// Classifies a response code from `command` and explains it.
  public init(
    responseCode rc: UInt32, command: String?, context: String? = nil, file: String = #fileID,
    line: Int = #line
  ) {
    let response = ResponseCode(rawValue: rc)
    let (code, explanation) = TPMError.classify(response)
    var reason = explanation
    if let context { reason = "\(context): \(reason)" }
    self.init(code, responseCode: response, command: command, reason: reason, file: file, line: line)
  }

  /// True when the TPM says this key can never be loaded here again: the blob fails its
  /// integrity check (the TPM was cleared, or it is another TPM: the state directory moved to
  /// new hardware), or a persistent key's handle is empty. A busy, unreachable or hung TPM is
  /// not a loss.
  public var meansKeyLost: Bool {
    guard let responseCode, code == .keyNotFound else { return false }
    return responseCode.base == .integrity || (command == "TPM2_ReadPublic" && responseCode.base == .handle)
  }

  public static func == (a: TPMError, b: TPMError) -> Bool {
    a.code == b.code && a.responseCode == b.responseCode
  }

  public var description: String {
    var s = "TPM error [\(code)]"
    if let command { s += " in \(command)" }
    s += ": \(reason)"
    if let responseCode { s += " [\(responseCode)]" }
    return s
  }

  static func classify(_ rc: ResponseCode) -> (Code, String) {
    switch rc {
    case .lockout:
      return (
        .lockout,
        "the TPM is in dictionary-attack lockout after too many wrong auth values; it recovers "
          + "after the lockout interval, or an owner clears it (tpm2_dictionarylockout --clear-lockout)"
      )
    case .authFail, .badAuth:
      return (.authFailed, "wrong auth value for the key or hierarchy")
    case .objectMemory, .sessionMemory:
      return (
        .objectSlotsFull,
        "the TPM's transient object slots are full; another process holds objects without a "
          + "resource manager (use /dev/tpmrm0 or tabrmd, or restart the process that leaked them)"
      )
    case .referenceH0:
      return (.keyNotFound, "the object is not loaded in the TPM")
    case .handle:
      return (.keyNotFound, "no object at that handle")
    case .integrity:
      return (
        .keyNotFound,
        "the key blob does not belong to this TPM or to this parent (SRK): created on another TPM, "
          + "or the TPM was cleared"
      )
    case .nvDefined:
      return (.handleInUse, "that persistent handle is already in use")
    case .curve, .keySize, .asymmetric, .scheme, .hash:
      return (.unsupported, "the TPM does not support this algorithm, curve, key size or scheme")
    case .yielded, .testing, .retry, .canceled:
      return (.busy, "the TPM is busy; try again")
    case .noTPM:
      return (.unreachable, "no TPM answered")
    case .badKeyFile:
      return (.invalidKeyFile, "not a loadable TSS2 PRIVATE KEY")
    case .badArgument:
      return (.invalidArgument, "invalid argument")
    case .srkMismatch:
      return (.srkMismatch, "0x81000001 holds a key that is not the standard storage root key")
    case .notASigningKey:
      return (
        .invalidArgument,
        "the object is not the kind of signing key this call takes (a device key is unrestricted, an "
          + "attestation key restricted)"
      )
    case .authRequired:
      return (.authRequired, "the key has a password and none was given (nothing was sent to the TPM)")
    case .timeout:
      return (
        .timeout,
        "the TPM did not answer in time (EDGEKEY_TPM_TIMEOUT_MS); the connection to it was dropped and is "
          + "made again on the next use"
      )
    default:
      if rc.layer == 10 || rc.layer == 11 {
        return (.unreachable, "the TPM could not be reached (\(rc.decoded))")
      }
      return (.tpmFailure, rc.decoded)
    }
  }
}

/// Runs a C core call that reports a response code and the command that failed.
@inline(__always)
func check(
  _ context: @autoclosure () -> String? = nil, file: String = #fileID, line: Int = #line,
  _ body: (UnsafeMutablePointer<UnsafePointer<CChar>?>) -> UInt32
) throws(TPMError) {
  var command: UnsafePointer<CChar>? = nil
  let rc = body(&command)
  if rc != 0 {
    throw TPMError(
      responseCode: rc, command: command.map { String(cString: $0) }, context: context(), file: file,
      line: line)
  }
}

/// Runs an ESAPI call named `command`.
@inline(__always)
func esys(
  _ command: String, _ context: @autoclosure () -> String? = nil, file: String = #fileID,
  line: Int = #line, _ rc: UInt32
) throws(TPMError) {
  if rc != 0 {
    throw TPMError(responseCode: rc, command: command, context: context(), file: file, line: line)
  }
}

/// Runs an ESAPI call named `command`, with no extra context.
@inline(__always)
func esys(_ command: String, _ rc: UInt32, file: String = #fileID, line: Int = #line) throws(TPMError) {
  if rc != 0 { throw TPMError(responseCode: rc, command: command, file: file, line: line) }
}
