import FoundationEssentials

/// The two date forms EdgeKey reads and writes: ISO 8601 in UTC for logs and reports, and the
/// HTTP-date of Retry-After (RFC 9110 §5.6.7). Plain arithmetic on the proleptic Gregorian
/// calendar: no locale, no time-zone database and no Foundation formatter (whose character-set
/// cache LeakSanitizer reports, and which costs microseconds per call in a log line).
package enum Timestamp {
  /// `2026-11-24T08:49:37Z`: UTC, whole seconds (truncated toward the past).
  package static func iso8601(_ date: Date) -> String {
    let seconds = Int64(date.timeIntervalSince1970.rounded(.down))
    let (days, secondOfDay) = floorDivision(seconds, 86_400)
    let (year, month, day) = civil(fromDays: days)
    return "\(pad(year, 4))-\(pad(month, 2))-\(pad(day, 2))T\(pad(secondOfDay / 3600, 2)):"
      + "\(pad(secondOfDay / 60 % 60, 2)):\(pad(secondOfDay % 60, 2))Z"
  }

  /// An HTTP-date in any of its three forms, or nil:
  /// IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, the obsolete RFC 850 form
  /// `Sunday, 06-Nov-94 08:49:37 GMT` and asctime's `Sun Nov  6 08:49:37 1994`.
  /// The weekday is checked for form but not against the date, as RFC 9110 allows.
  /// A two-digit year more than 50 years ahead of `now` is read as the century before.
  package static func httpDate(_ text: String, now: Date = Date()) -> Date? {
    let fields = text.split(separator: " ", omittingEmptySubsequences: true)
    guard let weekday = fields.first else { return nil }
    if weekday.hasSuffix(","), fields.count == 6, shortDays.contains(String(weekday.dropLast())), fields[5] == "GMT" {
      // IMF-fixdate: day, month, year, time, GMT.
      guard fields[1].count == 2, let day = number(fields[1]), let month = month(fields[2]),
        fields[3].count == 4, let year = number(fields[3])
      else { return nil }
      return date(year: year, month: month, day: day, time: fields[4])
    }
    if weekday.hasSuffix(","), fields.count == 4, longDays.contains(String(weekday.dropLast())), fields[3] == "GMT" {
      // RFC 850: dd-Mon-yy.
      let parts = fields[1].split(separator: "-", omittingEmptySubsequences: false)
      guard parts.count == 3, parts[0].count == 2, let day = number(parts[0]), let month = month(parts[1]),
        parts[2].count == 2, let yy = number(parts[2])
      else { return nil }
      let thisYear = civil(fromDays: floorDivision(Int64(now.timeIntervalSince1970.rounded(.down)), 86_400).0).year
      var year = thisYear - thisYear % 100 + yy
      if year > thisYear + 50 { year -= 100 }
      return date(year: year, month: month, day: day, time: fields[2])
    }
    if fields.count == 5, shortDays.contains(String(weekday)) {
      // asctime: Mon d time yyyy (the day padded with a space, which the split absorbs).
      guard let month = month(fields[1]), (1...2).contains(fields[2].count), let day = number(fields[2]),
        fields[4].count == 4, let year = number(fields[4])
      else { return nil }
      return date(year: year, month: month, day: day, time: fields[3])
    }
    return nil
  }

  /// Days since 1970-01-01 of a civil date (Howard Hinnant's days_from_civil).
  package static func days(year: Int, month: Int, day: Int) -> Int64 {
    let y = Int64(month <= 2 ? year - 1 : year)
    let era = (y >= 0 ? y : y - 399) / 400
    let yearOfEra = y - era * 400
    let m = Int64(month)
    let dayOfYear = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + Int64(day) - 1
    let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
    return era * 146_097 + dayOfEra - 719_468
  }

  /// The civil date of a day count since 1970-01-01 (civil_from_days).
  package static func civil(fromDays days: Int64) -> (year: Int, month: Int, day: Int) {
    let z = days + 719_468
    let era = (z >= 0 ? z : z - 146_096) / 146_097
    let dayOfEra = z - era * 146_097
    let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
    let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
    let mp = (5 * dayOfYear + 2) / 153
    let day = dayOfYear - (153 * mp + 2) / 5 + 1
    let month = mp < 10 ? mp + 3 : mp - 9
    let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
    return (Int(year), Int(month), Int(day))
  }

  private static let shortDays: Set<String> = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
  private static let longDays: Set<String> = [
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
  ]
  private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

  private static func month(_ name: Substring) -> Int? {
    months.firstIndex(of: String(name)).map { $0 + 1 }
  }

  /// Decimal digits only (no sign, no spaces), at most 4 of them.
  private static func number(_ text: Substring) -> Int? {
    guard !text.isEmpty, text.count <= 4, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
    return Int(text)
  }

  /// `year-month-day` at `HH:MM:SS` GMT, with every field in range (a leap second is not).
  private static func date(year: Int, month: Int, day: Int, time: Substring) -> Date? {
    let parts = time.split(separator: ":", omittingEmptySubsequences: false)
    guard parts.count == 3, parts.allSatisfy({ $0.count == 2 }), let hour = number(parts[0]),
      let minute = number(parts[1]), let second = number(parts[2]),
      hour < 24, minute < 60, second < 60, day >= 1, day <= daysIn(month: month, year: year)
    else { return nil }
    let seconds = days(year: year, month: month, day: day) * 86_400 + Int64(hour * 3600 + minute * 60 + second)
    return Date(timeIntervalSince1970: TimeInterval(seconds))
  }

  private static func daysIn(month: Int, year: Int) -> Int {
    switch month {
    case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
    case 4, 6, 9, 11: return 30
    default: return 31
    }
  }

  private static func floorDivision(_ a: Int64, _ b: Int64) -> (Int64, Int) {
    let q = a >= 0 ? a / b : (a - b + 1) / b
    return (q, Int(a - q * b))
  }

  private static func pad(_ value: some BinaryInteger, _ width: Int) -> String {
    let text = String(value)
    return text.count >= width ? text : String(repeating: "0", count: width - text.count) + text
  }
}
