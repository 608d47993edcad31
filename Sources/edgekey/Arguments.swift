import EdgeKeyCore

/// Command-line parsing written here (no outside packages): `--flag value`, `--flag=value`,
/// short aliases, booleans, and positional words.
struct Arguments {
  private(set) var words: [String] = []
  private var options: [String: String] = [:]
  private var flags: Set<String> = []

  /// `booleans` are the flags that take no value.
  init(_ argv: [String], booleans: Set<String>, aliases: [String: String]) throws(UsageError) {
    var i = 0
    while i < argv.count {
      var arg = argv[i]
      if let long = aliases[arg] { arg = long }
      if arg.hasPrefix("--") {
        var name = String(arg.dropFirst(2))
        var value: String? = nil
        if let eq = name.firstIndex(of: "=") {
          value = String(name[name.index(after: eq)...])
          name = String(name[..<eq])
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
        words.append(arg)
      }
      i += 1
    }
  }

  /// `argv` with `--config FILE` replaced by the file's `key = value` lines as `--key value`,
  /// placed before the other options so that the command line wins. A key must be one of
  /// `known` (a long option's name); booleans take true/false, yes/no or on/off.
  static func expandingConfig(_ argv: [String], booleans: Set<String>, known: Set<String>) throws(UsageError)
    -> [String]
  {
    var rest: [String] = []
    var path: String?
    var i = 0
    while i < argv.count {
      if argv[i] == "--config" {
        guard i + 1 < argv.count else { throw UsageError("--config needs a file") }
        path = argv[i + 1]
        i += 2
        continue
      }
      if argv[i].hasPrefix("--config=") {
        path = String(argv[i].dropFirst("--config=".count))
      } else {
        rest.append(argv[i])
      }
      i += 1
    }
    guard let path else { return argv }
    let file: ConfigFile
    do { file = try ConfigFile(contentsOf: path) } catch { throw UsageError(error.description) }
    var expanded: [String] = []
    for entry in file.entries {
      guard known.contains(entry.key), entry.key != "config", entry.key != "help" else {
        throw UsageError("\(path):\(entry.line): unknown option \"\(entry.key)\"")
      }
      if booleans.contains(entry.key) {
        switch entry.value.lowercased() {
        case "true", "yes", "on": expanded.append("--\(entry.key)")
        case "false", "no", "off": break
        default: throw UsageError("\(path):\(entry.line): \(entry.key) takes true or false, not \"\(entry.value)\"")
        }
      } else {
        expanded += ["--\(entry.key)", entry.value]
      }
    }
    let words = rest.prefix { !$0.hasPrefix("-") }
    return Array(words) + expanded + rest.dropFirst(words.count)
  }

  func option(_ name: String) -> String? { options[name] }
  func flag(_ name: String) -> Bool { flags.contains(name) }
  var optionNames: [String] { Array(options.keys) + Array(flags) }
}

struct UsageError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}
