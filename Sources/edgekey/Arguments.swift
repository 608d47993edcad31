import EdgeKeyCore

#if canImport(Glibc)
  import Glibc
#endif

/// Command-line parsing written here (no outside packages): `--flag value`, `--flag=value`,
/// short aliases, booleans, and positional words.
///
/// The arguments are kept as the bytes the process was given: a message payload passes
/// unchanged (`optionBytes`), and any other option that is not UTF-8 is a usage error (`option`)
/// instead of being rewritten with U+FFFD as Swift's `CommandLine.arguments` would.
struct Arguments {
  private(set) var words: [String] = []
  private var options: [String: [UInt8]] = [:]
  private var flags: Set<String> = []

  /// `booleans` are the flags that take no value.
  init(_ argv: [[UInt8]], booleans: Set<String>, aliases: [String: String]) throws(UsageError) {
    var i = 0
    while i < argv.count {
      let raw = argv[i]
      var arg = String(decoding: raw, as: UTF8.self)
      if let long = aliases[arg] { arg = long }
      if arg.hasPrefix("--") {
        guard String(validating: raw, as: UTF8.self) != nil else { throw UsageError("an option name is not UTF-8") }
        var name = String(arg.dropFirst(2))
        var value: [UInt8]? = nil
        if let eq = raw.firstIndex(of: UInt8(ascii: "=")), raw.starts(with: Array("--".utf8)) {
          value = Array(raw[(eq + 1)...])
          name = String(decoding: raw[2..<eq], as: UTF8.self)
        }
        if booleans.contains(name) {
          flags.insert(name)
        } else {
          if value == nil {
            i += 1
            guard i < argv.count else { throw UsageError("--\(name) needs a value") }
            value = argv[i]
          }
          options[name] = value
        }
      } else {
        guard let word = String(validating: raw, as: UTF8.self) else {
          throw UsageError("an argument is not UTF-8 text")
        }
        words.append(word)
      }
      i += 1
    }
  }

  /// The process's arguments as bytes, without the program name.
  static var processArguments: [[UInt8]] {
    (1..<Int(CommandLine.argc)).map { i in
      guard let p = CommandLine.unsafeArgv[i] else { return [] }
      return Array(
        UnsafeBufferPointer(start: UnsafeRawPointer(p).assumingMemoryBound(to: UInt8.self), count: strlen(p)))
    }
  }

  /// `argv` with `--config FILE` replaced by the file's `key = value` lines as `--key value`,
  /// placed before the other options so that the command line wins. A key must be one of
  /// `known` (a long option's name); booleans take true/false, yes/no or on/off.
  static func expandingConfig(_ argv: [[UInt8]], booleans: Set<String>, known: Set<String>) throws(UsageError)
    -> [[UInt8]]
  {
    let flag = Array("--config".utf8)
    let prefix = Array("--config=".utf8)
    var rest: [[UInt8]] = []
    var path: String?
    var i = 0
    while i < argv.count {
      if argv[i] == flag {
        guard i + 1 < argv.count else { throw UsageError("--config needs a file") }
        path = String(decoding: argv[i + 1], as: UTF8.self)
        i += 2
        continue
      }
      if argv[i].starts(with: prefix) {
        path = String(decoding: argv[i].dropFirst(prefix.count), as: UTF8.self)
      } else {
        rest.append(argv[i])
      }
      i += 1
    }
    guard let path else { return argv }
    let file: ConfigFile
    do { file = try ConfigFile(contentsOf: path) } catch { throw UsageError(error.description) }
    var expanded: [[UInt8]] = []
    for entry in file.entries {
      guard known.contains(entry.key), entry.key != "config", entry.key != "help" else {
        throw UsageError("\(path):\(entry.line): unknown option \"\(entry.key)\"")
      }
      if booleans.contains(entry.key) {
        switch entry.value.lowercased() {
        case "true", "yes", "on": expanded.append(Array("--\(entry.key)".utf8))
        case "false", "no", "off": break
        default: throw UsageError("\(path):\(entry.line): \(entry.key) takes true or false, not \"\(entry.value)\"")
        }
      } else {
        expanded += [Array("--\(entry.key)".utf8), Array(entry.value.utf8)]
      }
    }
    let words = rest.prefix { $0.first != UInt8(ascii: "-") }
    return Array(words) + expanded + rest.dropFirst(words.count)
  }

  /// The option's value as text; an option that is not UTF-8 is a usage error (exit 2), as
  /// mosquitto_pub treats a malformed topic.
  func option(_ name: String) -> String? {
    guard let raw = options[name] else { return nil }
    guard let text = String(validating: raw, as: UTF8.self) else {
      fail("--\(name) is not valid UTF-8 text", .usage)
    }
    return text
  }

  /// The option's value exactly as given (a payload: any bytes).
  func optionBytes(_ name: String) -> [UInt8]? { options[name] }
  func flag(_ name: String) -> Bool { flags.contains(name) }
  var optionNames: [String] { Array(options.keys) + Array(flags) }
}

struct UsageError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}
