internal import CEdgeKeyProvider
internal import CTSS2
import EdgeKeyCore

#if canImport(Glibc)
  import Glibc
#endif

/// A TPM 2.0, reached through one TCTI: the process's one ESAPI context for it.
///
/// ESAPI is neither thread-safe nor fork-safe, so there is exactly one `TPM` per TCTI per
/// process (``open(tcti:logger:)`` hands out the same instance while it lives), every
/// operation takes its lock, and a child process re-creates the context on first use.
/// Operations block their thread for one or more TPM round trips (about a millisecond on
/// swtpm, up to seconds on a real chip for RSA key creation): call them off the cooperative
/// pool for long operations.
public final class TPM: @unchecked Sendable {
  // @unchecked: all mutable state is behind the C core's mutex (edgekey_tpm_acquire).
  package let raw: OpaquePointer
  /// The TCTI this context talks through, e.g. `swtpm:host=127.0.0.1,port=2321`. In front of
  /// any TCTI, `delay:MS:` makes every command take MS milliseconds longer: a real chip's
  /// latency (25–540 ms) over swtpm's 1 ms, for tests and benchmarks.
  public let tcti: String
  /// True unless a resource manager we know sits between us and the TPM (tpm2-abrmd, the
  /// kernel's /dev/tpmrm*): swtpm, mssim, /dev/tpm0, and anything wrapped or spelled otherwise
  /// (`pcap:swtpm:…`). Without one, the TPM's few object slots are shared with every other
  /// process, and objects leaked by processes that died are flushed when slots run out.
  public let isDirect: Bool
  /// Transient objects leaked by other processes that this context flushed: when it opened,
  /// and whenever the TPM's slots ran out over a TCTI without a resource manager.
  public var leakedObjectsFlushed: Int { Int(edgekey_tpm_leaked_flushed(raw)) }

  /// TPM commands this process has sent to this TPM so far, counted at the TCTI. The
  /// difference across an operation is its cost (a TLS handshake: 1, TPM2_Sign).
  public var commandCount: UInt64 { edgekey_tpm_command_count(raw) }
  let logger: Logger

  /// How long one TPM command may take before it ends in ``TPMError/Code/timeout``: every
  /// command is bounded, over every TCTI (default 10 s, or `EDGEKEY_TPM_TIMEOUT_MS`; a real
  /// chip signs in 25–540 ms). Set it for the whole process: the context is shared.
  public var commandTimeout: Duration {
    get { timeouts().command }
    set { setTimeouts(command: newValue, keyGeneration: keyGenerationTimeout) }
  }

  /// The bound for key generation (TPM2_Create, TPM2_CreatePrimary, TPM2_CreateLoaded) and
  /// self tests: default 120 s, or `EDGEKEY_TPM_KEYGEN_TIMEOUT_MS` (RSA-2048 creation takes up
  /// to 7.5 s on real chips).
  public var keyGenerationTimeout: Duration {
    get { timeouts().keyGeneration }
    set { setTimeouts(command: commandTimeout, keyGeneration: newValue) }
  }

  /// Commands that timed out and whose TCTI call has not returned yet (over swtpm and mssim,
  /// whose reads have no deadline, until the TPM answers again); 0 in steady state.
  public var stuckCommands: Int { Int(edgekey_tpm_stuck_commands(raw)) }

  private func timeouts() -> (command: Duration, keyGeneration: Duration) {
    var command: Int32 = 0
    var keyGeneration: Int32 = 0
    edgekey_tpm_get_timeouts(raw, &command, &keyGeneration)
    return (.milliseconds(command), .milliseconds(keyGeneration))
  }

  private func setTimeouts(command: Duration, keyGeneration: Duration) {
    func milliseconds(_ d: Duration) -> Int32 { Int32(clamping: max(1, d.milliseconds)) }
    edgekey_tpm_set_timeouts(raw, milliseconds(command), milliseconds(keyGeneration))
  }

  private static let registry = Registry()

  private init(raw: OpaquePointer, logger: Logger) {
    self.raw = raw
    self.tcti = String(cString: edgekey_tpm_tcti(raw))
    self.isDirect = edgekey_tpm_is_direct(raw) != 0
    self.logger = logger
  }

  deinit {
    edgekey_tpm_unref(raw)
  }

  /// Opens the TPM, or returns the process's open context for the same TCTI.
  ///
  /// Resolution: `tcti` when given, then `EDGEKEY_TCTI`, then `TPM2TOOLS_TCTI`, then
  /// `device:/dev/tpmrm0`; each is tried until one answers, and the error names every one
  /// tried. Costs TPM2_Startup (tolerated when already started) and, over a TCTI without a
  /// resource manager, a flush of objects leaked by dead processes.
  public static func open(tcti: String? = nil, logger: Logger = .disabled) async throws(TPMError) -> TPM {
    // A real chip's start-up and a TCTI that does not answer take seconds: not on the
    // cooperative pool.
    try await BlockingPool.shared.run { () throws(TPMError) -> TPM in try open(tcti: tcti, logger: logger) }
  }

  /// Opens the TPM, as the async `open` does, on the calling thread (which it blocks for as
  /// long as the TCTI and the TPM take).
  public static func open(tcti: String? = nil, logger: Logger = .disabled) throws(TPMError) -> TPM {
    let logger = logger.labeled("edgekey.tpm")
    var candidates: [String] = []
    withUnsafeTemporaryAllocation(of: UnsafePointer<CChar>?.self, capacity: 4) { out in
      let n: Int32 =
        if let tcti { tcti.withCString { edgekey_tcti_candidates($0, out.baseAddress!) } } else {
          edgekey_tcti_candidates(nil, out.baseAddress!)
        }
      // The explicit string is ours and only valid inside withCString: take it from `tcti`.
      for i in 0..<Int(n) {
        if i == 0, let tcti, !tcti.isEmpty {
          candidates.append(tcti)
        } else {
          candidates.append(String(cString: out[i]!))
        }
      }
    }
    var failures: [String] = []
    var lastCode: UInt32 = 0
    for candidate in candidates {
      if let existing = registry.withLock({ $0[candidate]?.tpm }) { return existing }
      var raw: OpaquePointer? = nil
      var why = [CChar](repeating: 0, count: 512)
      let rc = edgekey_tpm_open_exact(candidate, &raw, &why, why.count)
      if rc == 0, let raw {
        let tpm = TPM(raw: raw, logger: logger)
        // Two threads may have raced to open the same TCTI: keep the first, drop ours.
        let winner = registry.withLock { table -> TPM in
          if let existing = table[candidate]?.tpm { return existing }
          table[candidate] = WeakTPM(tpm: tpm)
          return tpm
        }
        if winner === tpm {
          if tpm.leakedObjectsFlushed > 0 {
            logger.warning(
              "flushed \(tpm.leakedObjectsFlushed) transient objects leaked by a process that died",
              metadata: ["tcti": candidate])
          }
          logger.debug("opened TPM", metadata: ["tcti": candidate, "direct": "\(tpm.isDirect)"])
        }
        return winner
      }
      let reason = String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
      failures.append("\(candidate): \(reason)")
      logger.debug("TCTI did not answer", metadata: ["tcti": candidate, "reason": reason])
      lastCode = rc
    }
    throw TPMError(
      .unreachable, responseCode: ResponseCode(rawValue: lastCode), command: "open",
      reason: "no TPM answered; tried " + failures.joined(separator: "; "))
  }

  /// Runs `body` with the ESAPI context, holding the process-wide lock for this TPM.
  /// `body` must not call back into this `TPM` (the lock is not recursive).
  func withESYS<T>(_ body: (OpaquePointer) throws(TPMError) -> T) throws(TPMError) -> T {
    var rc: UInt32 = 0
    guard let ctx = edgekey_tpm_acquire(raw, &rc) else {
      throw TPMError(responseCode: rc, command: "Esys_Initialize", context: "re-creating the ESAPI context")
    }
    do {
      let result = try body(ctx)
      edgekey_tpm_release(raw)
      return result
    } catch {
      // A transport failure leaves ESAPI unusable: the context is made again on next use.
      edgekey_tpm_release_after(raw, error.responseCode?.rawValue ?? 0)
      throw error
    }
  }
}

/// The open TPMs by TCTI, behind a pthread mutex: ThreadSanitizer sees it, while it does not
/// see the futex calls of Synchronization.Mutex (which it reported as a race here).
private final class Registry: @unchecked Sendable {
  private let lock = Lock()
  private var table: [String: WeakTPM] = [:]

  func withLock<T>(_ body: (inout [String: WeakTPM]) -> T) -> T {
    lock.withLock { body(&table) }
  }
}

private struct WeakTPM {
  weak var tpm: TPM?
}

/// The ESAPI lifetime rules say outputs are freed with Esys_Free.
@inline(__always)
func esysFree<T>(_ p: UnsafeMutablePointer<T>?) {
  Esys_Free(p)
}
