/// DER, the little of it EdgeKey reads and writes itself (csrattrs, CSR attestation
/// bundles): definite lengths, tags of one byte.
package enum DER {
  /// A tag-length-value with `content`.
  package static func tlv(_ tag: UInt8, _ content: [UInt8]) -> [UInt8] {
    let n = content.count
    let length: [UInt8] =
      n < 0x80
      ? [UInt8(n)]
      : n < 0x100
        ? [0x81, UInt8(n)]
        : n < 0x10000
          ? [0x82, UInt8(n >> 8), UInt8(n & 0xFF)]
          : [0x83, UInt8(n >> 16), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)]
    return [tag] + length + content
  }

  package static func sequence(_ items: [[UInt8]]) -> [UInt8] { tlv(0x30, items.flatMap { $0 }) }
  package static func octetString(_ bytes: [UInt8]) -> [UInt8] { tlv(0x04, bytes) }

  /// An unsigned big-endian integer (leading zeros dropped, a zero added when the top bit is set).
  package static func integer(unsigned bytes: [UInt8]) -> [UInt8] {
    var b = Array(bytes.drop { $0 == 0 })
    if b.isEmpty { b = [0] }
    if b[0] & 0x80 != 0 { b.insert(0, at: 0) }
    return tlv(0x02, b)
  }

  /// An OBJECT IDENTIFIER from its dotted form ("2.23.133.20.1"); nil when it is not one.
  package static func oid(_ dotted: String) -> [UInt8]? {
    let arcs = dotted.split(separator: ".").map { UInt64($0) }
    guard arcs.count >= 2, !arcs.contains(nil), let first = arcs[0], let second = arcs[1], first <= 2,
      first == 2 || second < 40
    else { return nil }
    var content: [UInt8] = []
    for arc in [first * 40 + second] + arcs.dropFirst(2).map({ $0! }) {
      var chunk: [UInt8] = [UInt8(arc & 0x7F)]
      var rest = arc >> 7
      while rest > 0 {
        chunk.insert(UInt8(rest & 0x7F) | 0x80, at: 0)
        rest >>= 7
      }
      content += chunk
    }
    return tlv(0x06, content)
  }
}

/// A minimal DER reader: definite lengths, tags of one byte.
package struct DERReader {
  package struct Element {
    package var tag: UInt8
    package var content: ArraySlice<UInt8>
  }

  private var bytes: ArraySlice<UInt8>
  package init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

  package var atEnd: Bool { bytes.isEmpty }

  package mutating func next() -> Element? {
    var i = bytes.startIndex
    guard i + 1 < bytes.endIndex else { return nil }
    let tag = bytes[i]
    var length = Int(bytes[i + 1])
    i += 2
    if length & 0x80 != 0 {
      let count = length & 0x7F
      guard count >= 1, count <= 3, i + count <= bytes.endIndex else { return nil }
      length = bytes[i..<(i + count)].reduce(0) { $0 << 8 | Int($1) }
      i += count
    }
    guard length >= 0, i + length <= bytes.endIndex else { return nil }
    let content = bytes[i..<(i + length)]
    bytes = bytes[(i + length)...]
    return Element(tag: tag, content: content)
  }

  /// Every OID inside `bytes`, at any depth of constructed elements.
  package static func allOIDs(_ bytes: ArraySlice<UInt8>, depth: Int = 0) -> [String] {
    guard depth < 8 else { return [] }
    var reader = DERReader(bytes)
    var result: [String] = []
    while let e = reader.next() {
      if e.tag == 0x06 {
        result.append(dotted(e.content))
      } else if e.tag & 0x20 != 0 || e.tag == 0x04 {
        result += allOIDs(e.content, depth: depth + 1)
      }
    }
    return result
  }

  package static func dotted(_ bytes: ArraySlice<UInt8>) -> String {
    guard let first = bytes.first else { return "" }
    var parts = [first < 80 ? Int(first) / 40 : 2, first < 80 ? Int(first) % 40 : Int(first) - 80]
    var value = 0
    for byte in bytes.dropFirst() {
      value = value << 7 | Int(byte & 0x7F)
      if byte & 0x80 == 0 {
        parts.append(value)
        value = 0
      }
    }
    return parts.map(String.init).joined(separator: ".")
  }
}
