import EdgeKeyCore
import EdgeKeyEnrollment
import Foundation
import Testing

@Suite("timestamps: ISO 8601 for logs, HTTP-date for Retry-After, without Foundation's formatters")
struct TimestampTests {
  /// Foundation's Gregorian calendar in UTC is the independent oracle.
  static func oracle(_ date: Date) -> String {
    var calendar = Calendar(identifier: .gregorian)
    calendar.timeZone = TimeZone(identifier: "UTC")!
    let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: date)
    return String(format: "%04d-%02d-%02dT%02d:%02d:%02dZ", c.year!, c.month!, c.day!, c.hour!, c.minute!, c.second!)
  }

  @Test("ISO 8601 agrees with Foundation's calendar on fixed and on 20 000 random instants, 1950 to 2200")
  func iso8601() {
    #expect(Timestamp.iso8601(Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00Z")
    #expect(Timestamp.iso8601(Date(timeIntervalSince1970: 784_111_777)) == "1994-11-06T08:49:37Z")
    #expect(Timestamp.iso8601(Date(timeIntervalSince1970: 951_782_400)) == "2000-02-29T00:00:00Z")
    #expect(Timestamp.iso8601(Date(timeIntervalSince1970: -1)) == "1969-12-31T23:59:59Z")
    #expect(Timestamp.iso8601(Date(timeIntervalSince1970: 4_107_542_399.9)) == "2100-02-28T23:59:59Z")
    var generator = SystemRandomNumberGenerator()
    for _ in 0..<20_000 {
      let date = Date(
        timeIntervalSince1970: TimeInterval(Int64.random(in: -631_152_000...7_258_118_400, using: &generator)))
      #expect(Timestamp.iso8601(date) == Self.oracle(date))
    }
  }

  @Test("days and civil dates invert each other over 400 years, leap days included")
  func civilRoundTrip() {
    for days in Int64(-73_000)...Int64(73_000) {
      let (y, m, d) = Timestamp.civil(fromDays: days)
      #expect(Timestamp.days(year: y, month: m, day: d) == days)
    }
  }

  @Test("the three HTTP-date forms of RFC 9110 name the same instant")
  func httpDateForms() {
    let now = Date(timeIntervalSince1970: 1_795_000_000)  // 2026
    let expected = Date(timeIntervalSince1970: 784_111_777)
    #expect(Timestamp.httpDate("Sun, 06 Nov 1994 08:49:37 GMT", now: now) == expected)
    #expect(Timestamp.httpDate("Sunday, 06-Nov-94 08:49:37 GMT", now: now) == expected)
    #expect(Timestamp.httpDate("Sun Nov  6 08:49:37 1994", now: now) == expected)
    // Two-digit years: within 50 years ahead is this century, beyond it the one before.
    #expect(
      Timestamp.httpDate("Monday, 01-Jan-30 00:00:00 GMT", now: now).map(Timestamp.iso8601) == "2030-01-01T00:00:00Z")
    #expect(
      Timestamp.httpDate("Monday, 01-Jan-77 00:00:00 GMT", now: now).map(Timestamp.iso8601) == "1977-01-01T00:00:00Z")
    #expect(Timestamp.httpDate("Thu, 29 Feb 2024 23:59:59 GMT").map(Timestamp.iso8601) == "2024-02-29T23:59:59Z")
  }

  @Test(
    "a malformed HTTP-date is nil, never a guess",
    arguments: [
      "", "GMT", "Sun, 06 Nov 1994 08:49:37", "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 6 Nov 1994 08:49:37 GMT",
      "Sun, 06 Nov 94 08:49:37 GMT", "Sun, 06 nov 1994 08:49:37 GMT", "Sun, 31 Nov 1994 08:49:37 GMT",
      "Sun, 29 Feb 2100 00:00:00 GMT", "Sun, 06 Nov 1994 24:00:00 GMT", "Sun, 06 Nov 1994 08:60:00 GMT",
      "Sun, 06 Nov 1994 08:49:60 GMT", "Sun, 06 Nov 1994 8:49:37 GMT", "Sun, 06 Nov +994 08:49:37 GMT",
      "Sun, 00 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-1994 08:49:37 GMT", "Sun, 06-Nov-94 08:49:37 GMT",
      "Sun Nov  6 08:49:37 94", "Sun Nov 006 08:49:37 1994", "Sun, 06 Nov 1994 08:49:37 GMT extra",
    ])
  func malformedHTTPDate(_ text: String) {
    #expect(Timestamp.httpDate(text) == nil)
  }

  @Test("Retry-After: delta-seconds, a date in the future, a date in the past (0), garbage (nil)")
  func retryAfter() {
    let now = Date(timeIntervalSince1970: 784_111_700)
    #expect(ESTBody.retryAfter("120", now: now) == 120)
    #expect(ESTBody.retryAfter(" 7 ", now: now) == 7)
    #expect(ESTBody.retryAfter("-5", now: now) == 0)
    #expect(ESTBody.retryAfter("Sun, 06 Nov 1994 08:49:37 GMT", now: now) == 77)
    #expect(ESTBody.retryAfter("Sat, 05 Nov 1994 08:49:37 GMT", now: now) == 0)
    #expect(ESTBody.retryAfter("soon", now: now) == nil)
    #expect(ESTBody.retryAfter("", now: now) == nil)
  }
}
