#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#endif

/// Errors of file storage, with the path and the system's reason.
public struct FileError: Error, Sendable, Equatable, CustomStringConvertible {
  /// The file or directory concerned.
  public var path: String
  /// What was being done: "open", "write", "fsync", "rename"...
  public var operation: String
  /// The system's error number (`ENOSPC`, `EACCES`, ...).
  public var errno: Int32

  /// An error of `operation` on `path` with the system's `errno`.
  public init(path: String, operation: String, errno: Int32) {
    self.path = path
    self.operation = operation
    self.errno = errno
  }

  public var description: String {
    "\(operation) \(path): \(String(cString: strerror(errno)))"
  }
}

/// Files replaced whole or not at all: write to a temporary file in the same directory,
/// fsync it, rename it over the target, fsync the directory. A crash at any instant leaves
/// either the old content or the new, never a torn file. Costs two fsyncs.
package enum AtomicFile {
  /// Replaces the file at `path` with `bytes`, created with permissions `mode`.
  package static func write(_ bytes: [UInt8], to path: String, mode: mode_t = 0o600) throws(FileError) {
    let directory = parentDirectory(of: path)
    let temporary = "\(path).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
    guard fd >= 0 else { throw FileError(path: temporary, operation: "create", errno: Glibc.errno) }
    var failure: FileError?
    var written = 0
    bytes.withUnsafeBytes { raw in
      while written < raw.count {
        let n = Glibc.write(fd, raw.baseAddress! + written, raw.count - written)
        if n < 0 {
          if Glibc.errno == EINTR { continue }
          failure = FileError(path: temporary, operation: "write", errno: Glibc.errno)
          return
        }
        written += n
      }
    }
    if failure == nil, fchmod(fd, mode) != 0 {
      failure = FileError(path: temporary, operation: "chmod", errno: Glibc.errno)
    }
    if failure == nil, fsync(fd) != 0 {
      failure = FileError(path: temporary, operation: "fsync", errno: Glibc.errno)
    }
    close(fd)
    if let failure {
      unlink(temporary)
      throw failure
    }
    guard rename(temporary, path) == 0 else {
      let e = Glibc.errno
      unlink(temporary)
      throw FileError(path: path, operation: "rename", errno: e)
    }
    try syncDirectory(directory)
  }

  /// Reads a whole file.
  package static func read(_ path: String, limit: Int = 16 << 20) throws(FileError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw FileError(path: path, operation: "open", errno: Glibc.errno) }
    defer { close(fd) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
      let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
      if n < 0 {
        if Glibc.errno == EINTR { continue }
        throw FileError(path: path, operation: "read", errno: Glibc.errno)
      }
      if n == 0 { break }
      result.append(contentsOf: chunk[0..<n])
      if result.count > limit { throw FileError(path: path, operation: "read", errno: EFBIG) }
    }
    return result
  }

  /// Creates `path` and missing parents with `mode` (0700 by default).
  package static func makeDirectory(_ path: String, mode: mode_t = 0o700) throws(FileError) {
    var current = path.hasPrefix("/") ? "" : "."
    for component in path.split(separator: "/") {
      current += "/" + component
      if mkdir(current, mode) != 0 && Glibc.errno != EEXIST {
        throw FileError(path: current, operation: "mkdir", errno: Glibc.errno)
      }
    }
  }

  static func parentDirectory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return slash == path.startIndex ? "/" : String(path[..<slash])
  }

  /// fsyncs a directory, so that renames and unlinks in it survive a power cut.
  package static func syncDirectory(_ directory: String) throws(FileError) {
    let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { throw FileError(path: directory, operation: "open", errno: Glibc.errno) }
    defer { close(fd) }
    if fsync(fd) != 0 { throw FileError(path: directory, operation: "fsync", errno: Glibc.errno) }
  }
}

/// A log that only grows: each record is appended and fsync'd before `append` returns.
package enum AppendOnlyFile {
  package static func append(_ bytes: [UInt8], to path: String, mode: mode_t = 0o600) throws(FileError) {
    let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, mode)
    guard fd >= 0 else { throw FileError(path: path, operation: "open", errno: Glibc.errno) }
    defer { close(fd) }
    var written = 0
    while written < bytes.count {
      let n = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
      if n < 0 {
        if Glibc.errno == EINTR { continue }
        throw FileError(path: path, operation: "write", errno: Glibc.errno)
      }
      written += n
    }
    if fsync(fd) != 0 { throw FileError(path: path, operation: "fsync", errno: Glibc.errno) }
  }
}
