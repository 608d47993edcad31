import EdgeKeyFuzzTargets

#if canImport(Glibc)
  import Glibc
#endif

// libFuzzer's entry point. The target is chosen by $EDGEKEY_FUZZ_TARGET (one binary, one build).
// Built by `scripts/fuzz` with `-sanitize=fuzzer,address -DEDGEKEY_FUZZING`: then main() hands
// over to libFuzzer's driver (SwiftPM links an executable's main under the module's name, so
// libFuzzer's own main() cannot be used).

private func complain(_ text: String) {
  var line = text + "\n"
  line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

private let selected: @Sendable ([UInt8]) -> Void = {
  let name = getenv("EDGEKEY_FUZZ_TARGET").map { String(cString: $0) } ?? ""
  guard let target = FuzzTargets.all[name] else {
    complain("set EDGEKEY_FUZZ_TARGET to one of: \(FuzzTargets.names.joined(separator: " "))")
    exit(2)
  }
  return target
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func edgekeyFuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
  selected(size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size)))
  return 0
}

#if EDGEKEY_FUZZING
  @_silgen_name("LLVMFuzzerRunDriver")
  func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
  ) -> CInt

  @_cdecl("edgekey_fuzz_main")
  func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var vector = argv
    return LLVMFuzzerRunDriver(&count, &vector) { edgekeyFuzzOne($0, $1) }
  }
#else
  /// Without libFuzzer: runs the files named on the command line through the target, e.g. to
  /// replay a crash that `scripts/fuzz` saved.
  @main
  struct Replay {
    static func main() {
      for path in CommandLine.arguments.dropFirst() {
        guard let file = fopen(path, "rb") else {
          complain("cannot open \(path)")
          exit(1)
        }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while case let n = fread(&buffer, 1, buffer.count, file), n > 0 { bytes += buffer[0..<n] }
        fclose(file)
        selected(bytes)
        print("\(path): ok")
      }
    }
  }
#endif
