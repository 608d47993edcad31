/// Logging for a library that must not own the process's logging.
///
/// The shape follows swift-log: a value ``Logger`` with lazily built messages and a
/// ``LogHandler`` that receives events. The default handler discards everything; a daemon
/// bridges to swift-log, journald or syslog by implementing ``LogHandler`` in a few lines.
public struct Logger: Sendable {
  /// Severity, ordered from the most verbose to the most severe.
  public enum Level: Int, Sendable, Comparable, CaseIterable, CustomStringConvertible {
    /// From `trace` (every step) to `critical` (the process cannot go on).
    case trace, debug, info, notice, warning, error, critical

    public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
    public var description: String {
      switch self {
      case .trace: "trace"
      case .debug: "debug"
      case .info: "info"
      case .notice: "notice"
      case .warning: "warning"
      case .error: "error"
      case .critical: "critical"
      }
    }
  }

  /// One log entry.
  public struct Event: Sendable {
    /// How severe.
    public var level: Level
    /// The logging component ("edgekey.tpm").
    public var label: String
    /// The text, built only because the level was enabled. Never holds a secret.
    public var message: String
    /// The logger's metadata merged with the call's (the call's wins).
    public var metadata: [String: String]
    /// Where it was logged (`#fileID`).
    public var file: String
    /// The line it was logged at.
    public var line: Int
  }

  /// Names the component that logs ("edgekey.tpm").
  public var label: String
  /// Events below this level are not built (their message closures are never run).
  public var level: Level
  /// Added to every event of this logger.
  public var metadata: [String: String]
  /// Receives the events at or above `level`.
  public var handler: any LogHandler

  /// A logger that discards everything: the default of every EdgeKey entry point.
  public static let disabled = Logger(label: "edgekey", level: .critical, handler: DiscardingLogHandler())

  /// A logger for `label` that hands events at or above `level` to `handler`.
  public init(
    label: String, level: Level = .info, metadata: [String: String] = [:],
    handler: any LogHandler
  ) {
    self.label = label
    self.level = level
    self.metadata = metadata
    self.handler = handler
  }

  /// The same logger with another label, for a sub-component.
  public func labeled(_ label: String) -> Logger {
    var copy = self
    copy.label = label
    return copy
  }

  /// Logs `message` at `level`; the message is built only when the level is enabled.
  public func log(
    _ level: Level, _ message: @autoclosure () -> String, metadata: [String: String] = [:],
    file: String = #fileID, line: Int = #line
  ) {
    guard level >= self.level, !(handler is DiscardingLogHandler) else { return }
    handler.log(
      event: Event(
        level: level, label: label, message: message(),
        metadata: self.metadata.merging(metadata) { $1 }, file: file, line: line))
  }

  /// Logs at `.trace`.
  public func trace(
    _ m: @autoclosure () -> String, metadata: [String: String] = [:], file: String = #fileID, line: Int = #line
  ) {
    log(.trace, m(), metadata: metadata, file: file, line: line)
  }
  /// Logs at `.debug`.
  public func debug(
    _ m: @autoclosure () -> String, metadata: [String: String] = [:], file: String = #fileID, line: Int = #line
  ) {
    log(.debug, m(), metadata: metadata, file: file, line: line)
  }
  /// Logs at `.info`.
  public func info(
    _ m: @autoclosure () -> String, metadata: [String: String] = [:], file: String = #fileID, line: Int = #line
  ) {
    log(.info, m(), metadata: metadata, file: file, line: line)
  }
  /// Logs at `.notice`.
  public func notice(
    _ m: @autoclosure () -> String, metadata: [String: String] = [:], file: String = #fileID, line: Int = #line
  ) {
    log(.notice, m(), metadata: metadata, file: file, line: line)
  }
  /// Logs at `.warning`.
  public func warning(
    _ m: @autoclosure () -> String, metadata: [String: String] = [:], file: String = #fileID, line: Int = #line
  ) {
    log(.warning, m(), metadata: metadata, file: file, line: line)
  }
  /// Logs at `.error`.
  public func error(
    _ m: @autoclosure () -> String, metadata: [String: String] = [:], file: String = #fileID, line: Int = #line
  ) {
    log(.error, m(), metadata: metadata, file: file, line: line)
  }
}

/// Receives log events. Called on whatever thread logged, including libraries' own threads.
public protocol LogHandler: Sendable {
  /// Handles one event; must not block for long (it runs on EdgeKey's network and TPM threads).
  func log(event: Logger.Event)
}

/// Drops everything.
public struct DiscardingLogHandler: LogHandler {
  /// A handler that drops every event.
  public init() {}
  /// Does nothing.
  public func log(event: Logger.Event) {}
}

/// Writes one line per event to standard error: for command-line tools and tests.
public struct StandardErrorLogHandler: LogHandler {
  /// A handler that writes to file descriptor 2.
  public init() {}
  /// Writes "level label: message key=value..." as one line.
  public func log(event: Logger.Event) {
    var line = "\(event.level) \(event.label): \(event.message)"
    if !event.metadata.isEmpty {
      line +=
        " "
        + event.metadata.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        .joined(separator: " ")
    }
    line += "\n"
    StandardError.write(line)
  }
}

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#endif

/// Lines for standard error, written whole with write(2): unbuffered, and no shared FILE* to
/// reason about across threads.
public enum StandardError {
  /// Writes `s` to file descriptor 2 with one write(2).
  public static func write(_ s: String) {
    var s = s
    // write(2) on fd 2: unbuffered, and no shared FILE* to reason about across threads.
    s.withUTF8 { buf in _ = Glibc.write(2, buf.baseAddress, buf.count) }
  }
}
