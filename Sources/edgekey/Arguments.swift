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

  func option(_ name: String) -> String? { options[name] }
  func flag(_ name: String) -> Bool { flags.contains(name) }
  var optionNames: [String] { Array(options.keys) + Array(flags) }
}

struct UsageError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}
