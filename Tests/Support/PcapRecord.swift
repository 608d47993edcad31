import Foundation

/// Reads what tpm2-tss's `pcap` TCTI recorded (pcapng: each TPM command and response as a
/// TCP packet, commands addressed to port 2321): an independent count of the TPM commands a
/// process sent, outside EdgeKey's own counters.
public enum PcapRecord {
  /// The command codes (TPM_CC) of every command in the file, in order.
  public static func commands(in url: URL) throws -> [UInt32] {
    let data = [UInt8](try Data(contentsOf: url))
    func u32(_ i: Int) -> UInt32 {
      UInt32(data[i]) | UInt32(data[i + 1]) << 8 | UInt32(data[i + 2]) << 16 | UInt32(data[i + 3]) << 24
    }
    func be16(_ i: Int) -> Int { Int(data[i]) << 8 | Int(data[i + 1]) }
    func be32(_ i: Int) -> UInt32 {
      UInt32(data[i]) << 24 | UInt32(data[i + 1]) << 16 | UInt32(data[i + 2]) << 8 | UInt32(data[i + 3])
    }
    var result: [UInt32] = []
    var offset = 0
    while offset + 12 <= data.count {
      let type = u32(offset)
      let length = Int(u32(offset + 4))
      guard length >= 12, offset + length <= data.count else {
        throw HarnessError("damaged pcapng block at \(offset)")
      }
      if type == 6 {  // Enhanced Packet Block: 28 bytes of header, then the packet
        let packet = offset + 28
        let ipHeader = Int(data[packet] & 0x0F) * 4
        let tcp = packet + ipHeader
        let tcpHeader = Int(data[tcp + 12] >> 4) * 4
        let payload = tcp + tcpHeader
        if be16(tcp + 2) == 2321, payload + 10 <= offset + length {
          result.append(be32(payload + 6))
        }
      }
      offset += length
    }
    return result
  }

  /// TPM_CC_Sign.
  public static let sign: UInt32 = 0x0000_015D
}
