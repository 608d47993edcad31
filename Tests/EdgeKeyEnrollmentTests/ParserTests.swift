import EdgeKeyCore
import EdgeKeyFuzzTargets
import EdgeKeyRA
import Foundation
import Testing

@Suite("parsers of outside input: the fuzz corpus, configuration files, HTTP request heads")
struct ParserTests {
  static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("../Fuzz/Corpus").standardized

  @Test("every fuzz target has a seed corpus, and every corpus file (seeds and past findings) runs through it")
  func corpusReplays() throws {
    let directories = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path).sorted()
    #expect(directories == FuzzTargets.names)
    var files = 0
    for name in FuzzTargets.names {
      let dir = Self.corpus.appendingPathComponent(name)
      let entries = try FileManager.default.contentsOfDirectory(atPath: dir.path)
      #expect(!entries.isEmpty, "no seed for \(name)")
      for entry in entries {
        let bytes = try [UInt8](Data(contentsOf: dir.appendingPathComponent(entry)))
        FuzzTargets.all[name]!(bytes)
        files += 1
      }
    }
    #expect(files >= FuzzTargets.names.count)
  }

  @Test("configuration files: comments, quotes, escapes, CRLF; the line and reason of every refusal")
  func configFile() throws {
    let text = """
      # agent
        state = /var/lib/edgekey\r
      server=https://est.example/.well-known/est#frag
      subject = "O=Acme, Inc.,CN=dev 1"   # trailing comment
      label = "tab\\there \\"q\\" \\\\"
      empty =

      """
    let file = try ConfigFile(parsing: Array(text.utf8), origin: "a.conf")
    #expect(file.entries.map(\.key) == ["state", "server", "subject", "label", "empty"])
    #expect(file["state"] == "/var/lib/edgekey")
    #expect(file["server"] == "https://est.example/.well-known/est#frag")
    #expect(file["subject"] == "O=Acme, Inc.,CN=dev 1")
    #expect(file["label"] == "tab\there \"q\" \\")
    #expect(file["empty"] == "")
    #expect(file.entries[2].line == 4)
    let again = try ConfigFile(parsing: Array(file.text.utf8), origin: "b.conf")
    #expect(again.entries.map { [$0.key, $0.value] } == file.entries.map { [$0.key, $0.value] })

    let refusals: [(String, Int?, String)] = [
      ("a = 1\nb\n", 2, "expected key = value"),
      ("a = 1\na = 2\n", 2, "already set on line 1"),
      ("Port = 1\n", 1, "invalid key"),
      (" = 1\n", 1, "missing key"),
      ("a = \"open\n", 1, "missing closing quote"),
      ("a = \"x\" y\n", 1, "text after the closing quote"),
      ("a = \"\\q\"\n", 1, "unknown escape"),
      ("a = x\u{7}\n", 1, "control character"),
    ]
    for (text, line, reason) in refusals {
      #expect {
        _ = try ConfigFile(parsing: Array(text.utf8), origin: "c.conf")
      } throws: { error in
        let e = error as! ConfigError
        return e.line == line && e.reason.contains(reason) && e.description.hasPrefix("c.conf")
      }
    }
    #expect(throws: ConfigError.self) { try ConfigFile(parsing: [0x61, 0x3D, 0xFF], origin: "d") }
    #expect(throws: ConfigError.self) {
      try ConfigFile(parsing: [UInt8](repeating: 0x23, count: ConfigFile.maximumBytes + 1), origin: "e")
    }
  }

  @Test("HTTP request heads: what the RA serves and what it refuses, with the status")
  func requestHead() throws {
    func parse(_ text: String) -> Result<HTTPRequestHead, HTTPRequestHead.Refusal> {
      Result { () throws(HTTPRequestHead.Refusal) in try HTTPRequestHead(parsing: Array(text.utf8)[...]) }
    }
    let ok = try parse("POST /.well-known/est/simpleenroll?a=b HTTP/1.1\r\nContent-Length: 12\r\nX-A:  v \r\n").get()
    #expect(ok.method == "POST" && ok.path == "/.well-known/est/simpleenroll" && ok.contentLength == 12)
    #expect(ok.headers.last?.name == "x-a" && ok.headers.last?.value == "v")
    let cases: [(String, Int)] = [
      ("GET /x HTTP/2\r\n", 400), ("GET x HTTP/1.1\r\n", 400), ("GET  /x HTTP/1.1\r\n", 400),
      ("GET /x HTTP/1.1\r\nno colon\r\n", 400), ("GET /x HTTP/1.1\r\n: v\r\n", 400),
      ("POST /x HTTP/1.1\r\nContent-Length: -1\r\n", 400), ("POST /x HTTP/1.1\r\nContent-Length: +5\r\n", 400),
      ("POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n", 400),
      ("POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n", 400),
      ("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 411),
    ]
    for (text, status) in cases {
      guard case .failure(let refusal) = parse(text) else {
        Issue.record("accepted: \(text.debugDescription)")
        continue
      }
      #expect(refusal.response.status == status, "\(text.debugDescription)")
    }
  }
}
