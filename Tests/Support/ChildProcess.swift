import CEdgeKeyTestHelpers
import Foundation

#if canImport(Glibc)
  import Glibc
#endif

/// A long-running server process (swtpm, mosquitto, the RA) started with a clean signal mask.
///
/// Foundation's `Process` hands its children the spawning thread's blocked signals, so a
/// server started from a test's worker thread ignores SIGTERM; this one does not. `deinit`
/// terminates the process and reaps it.
public final class ChildProcess: @unchecked Sendable {
  // @unchecked: `pid` is written once before the instance is shared.
  public private(set) var pid: pid_t = 0
  private var exitStatus: Int32?
  /// The exit code once it has exited normally; nil while running or after a signal.
  public var exitCode: Int32? {
    guard !isRunning, let s = exitStatus, s & 0x7f == 0 else { return nil }
    return (s >> 8) & 0xff
  }

  /// Starts `path` with `arguments`, output appended to `logPath`.
  public init(_ path: String, _ arguments: [String], logPath: String, environment: [String: String]? = nil) throws {
    harnessIgnoresSIGPIPE
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    // Nothing else of ours may leak into the child: a TPM command in flight on another thread
    // has the swtpm TCTI's socket open (without close-on-exec), and a long-lived child holding
    // a copy keeps that swtpm busy with a dead connection forever.
    edgekey_test_spawn_closefrom(&actions, 3)

    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var empty = sigset_t()
    sigemptyset(&empty)
    var all = sigset_t()
    sigfillset(&all)
    posix_spawnattr_setsigmask(&attributes, &empty)
    posix_spawnattr_setsigdefault(&attributes, &all)
    // Its own process group, so a stop reaches whatever it forks.
    posix_spawnattr_setpgroup(&attributes, 0)
    posix_spawnattr_setflags(
      &attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))

    let argv = ([path] + arguments).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    let env = (environment ?? ProcessInfo.processInfo.environment).map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { env.forEach { free($0) } }
    var child: pid_t = 0
    let rc = posix_spawn(&child, path, &actions, &attributes, argv, env)
    guard rc == 0 else { throw HarnessError("cannot start \(path): \(String(cString: strerror(rc)))") }
    pid = child
  }

  deinit { stop() }

  /// True while the process has not exited.
  public var isRunning: Bool {
    guard exitStatus == nil else { return false }
    var status: Int32 = 0
    let r = waitpid(pid, &status, WNOHANG)
    if r == pid { exitStatus = status }
    return r == 0
  }

  /// Sends `signal` (SIGSTOP and SIGCONT pause and resume it).
  public func send(_ signal: Int32) { if isRunning { kill(pid, signal) } }

  /// SIGTERM, then SIGKILL after `grace` seconds; reaps the process.
  public func stop(grace: Double = 5) {
    guard isRunning else { return }
    kill(pid, SIGCONT)
    kill(pid, SIGTERM)
    let deadline = Date().addingTimeInterval(grace)
    while isRunning && Date() < deadline { usleep(10_000) }
    if isRunning {
      kill(pid, SIGKILL)
      var status: Int32 = 0
      waitpid(pid, &status, 0)
      exitStatus = status
    }
  }

  /// Waits for the process to exit by itself; its exit code, or 128 + the signal that ended it.
  public func wait() -> Int32 {
    if exitStatus == nil {
      var status: Int32 = 0
      while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
      exitStatus = status
    }
    let s = exitStatus!
    return s & 0x7f == 0 ? (s >> 8) & 0xff : 128 + (s & 0x7f)
  }

  /// SIGKILL without grace, as a crash or power cut would.
  public func kill9() {
    guard isRunning else { return }
    kill(pid, SIGKILL)
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    exitStatus = status
  }
}

/// The test harness ignores SIGPIPE for its own sake: its proxies and pipes to child processes
/// write to peers that may be gone. EdgeKey's library code no longer does it for the process
/// (a test in a process of its own checks that with the default disposition), so the harness
/// says it here, once, from the helpers every test that writes to a socket or pipe goes through.
public let harnessIgnoresSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()
