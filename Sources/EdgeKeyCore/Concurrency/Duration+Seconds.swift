extension Duration {
  /// As seconds, fractional (for C calls and arithmetic that take seconds).
  package var seconds: Double {
    let (s, attoseconds) = components
    return Double(s) + Double(attoseconds) * 1e-18
  }

  /// As whole milliseconds, rounded towards zero (for `poll` and C timeouts in ms).
  package var milliseconds: Int64 {
    let (s, attoseconds) = components
    return s * 1000 + attoseconds / 1_000_000_000_000_000
  }

  /// As a short text for messages and logs: "15 s", "0.25 s".
  package var secondsText: String {
    let value = seconds
    return value == value.rounded() ? "\(Int64(value)) s" : "\(value) s"
  }
}
