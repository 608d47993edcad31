internal import CMosquitto

/// Topic names and filters checked as the broker will check them (MQTT 3.1.1 §4.7, MQTT 5
/// §4.7), before anything is sent: UTF-8, not empty, at most 65535 bytes, no NUL; `+` and `#`
/// only in filters, `+` a whole level and `#` the last one.
public enum MQTTTopic {
  /// Throws ``MQTTError/Kind/invalidArgument`` unless `topic` is a name one may publish to.
  public static func checkName(_ topic: String) throws(MQTTError) {
    try check(topic, what: "a topic to publish to (empty, a wildcard, NUL, or too long)", mosquitto_pub_topic_check2)
  }

  /// Throws ``MQTTError/Kind/invalidArgument`` unless `filter` is a valid subscription filter
  /// (`a/#/b` is not: `#` must be the last level).
  public static func checkFilter(_ filter: String) throws(MQTTError) {
    try check(
      filter, what: "a subscription filter (empty, NUL, too long, or + and # not whole levels, # not last)",
      mosquitto_sub_topic_check2)
  }

  /// Whether `topic` matches the subscription `filter` (`+` one level, `#` the rest), as the
  /// broker decides it (libmosquitto's matcher).
  public static func matches(filter: String, topic: String) -> Bool {
    var result = false
    let (f, t) = (Array(filter.utf8), Array(topic.utf8))
    let rc = f.withUnsafeBufferPointer { fb in
      t.withUnsafeBufferPointer { tb in
        fb.withMemoryRebound(to: CChar.self) { fc in
          tb.withMemoryRebound(to: CChar.self) { tc in
            mosquitto_topic_matches_sub2(fc.baseAddress, fc.count, tc.baseAddress, tc.count, &result)
          }
        }
      }
    }
    return rc == MOSQ_ERR_SUCCESS.rawValue && result
  }

  private static func check(
    _ text: String, what: String, _ checker: (UnsafePointer<CChar>?, Int) -> Int32
  ) throws(MQTTError) {
    let bytes = Array(text.utf8)
    let rc = bytes.withUnsafeBufferPointer { b in
      b.withMemoryRebound(to: CChar.self) { checker($0.baseAddress, b.count) }
    }
    guard rc == MOSQ_ERR_SUCCESS.rawValue, !bytes.isEmpty, !bytes.contains(0) else {
      throw MQTTError(kind: .invalidArgument, reason: "\"\(text)\" is not \(what)")
    }
  }
}
