import Foundation

/// The one report a run ends with: every figure beside its anchor, measured in this run, as a
/// Markdown table (what the README shows).
final class Report: @unchecked Sendable {
  static let shared = Report()
  private let lock = NSLock()
  private var lines: [(figure: String, ours: String, anchor: String, ratio: String)] = []

  /// `higherIsBetter` decides how the ratio reads: ours / anchor ("38.8×"), or for costs
  /// "8.9× less" / "4.57× more".
  func add(_ figure: String, ours: Double, anchorName: String, anchor: Double, unit: String, higherIsBetter: Bool) {
    let ratio: String
    if !higherIsBetter && ours == 0 && anchor > 0 {
      ratio = "none needed"
    } else if anchor <= 0 || ours <= 0 {
      ratio = "-"
    } else if abs(ours - anchor) <= anchor * 0.005 {
      ratio = "the same"
    } else if higherIsBetter {
      ratio = String(format: "%.2f×", ours / anchor)
    } else {
      // Lower is better: say how many times less (or more) EdgeKey needs.
      ratio =
        ours <= anchor
        ? String(format: "%.1f× less", anchor / ours) : String(format: "%.2f× more", ours / anchor)
    }
    lock.withLock {
      lines.append((figure, Report.format(ours) + " " + unit, "\(anchorName): \(Report.format(anchor)) \(unit)", ratio))
    }
  }

  func note(_ figure: String, _ text: String) {
    lock.withLock { lines.append((figure, text, "", "")) }
  }

  static func format(_ v: Double) -> String {
    v >= 100 ? String(format: "%.0f", v) : v >= 10 ? String(format: "%.1f", v) : String(format: "%.2f", v)
  }

  func print(machine: String) {
    let rows = lock.withLock { lines }
    guard !rows.isEmpty else { return }
    Swift.print("")
    Swift.print("## EdgeKey benchmark report (\(machine))")
    Swift.print("")
    Swift.print("| figure | EdgeKey | anchor | EdgeKey / anchor |")
    Swift.print("|---|---:|---:|---:|")
    for r in rows { Swift.print("| \(r.figure) | \(r.ours) | \(r.anchor) | \(r.ratio) |") }
  }
}
