import EdgeKeyTLS

/// How the stored trust anchors follow the CA's `cacerts` (RFC 7030 §4.1.3, RFC 4210 §4.4):
/// a new root is added only when the answer proves it, by a certificate for the new root's
/// name and key issued by an anchor we already trust (NewWithOld); an anchor is dropped only
/// when the server no longer sends it and our current certificate chains without it.
enum AnchorRollover {
  struct Outcome: Equatable {
    var anchors: [Certificate]
    var added: [Certificate] = []
    /// Stored anchors the server no longer sends; dropped once the current chain is proven.
    var withdrawn: [Certificate] = []

    static func == (a: Outcome, b: Outcome) -> Bool {
      a.anchors.map(\.der) == b.anchors.map(\.der) && a.added.map(\.der) == b.added.map(\.der)
        && a.withdrawn.map(\.der) == b.withdrawn.map(\.der)
    }
  }

  /// - Parameters:
  ///   - stored: the anchors learnt so far (empty before the first `cacerts`).
  ///   - configured: the anchors the device was given (trusted for the channel `offered` came
  ///     over, and to vouch for the first roots).
  ///   - offered: the `cacerts` answer.
  static func merge(stored: [Certificate], configured: [Certificate], offered: [Certificate]) -> Outcome {
    let roots = offered.filter { $0.isCA && $0.isSelfSigned }
    var trusted = stored.isEmpty ? configured : stored
    var outcome = Outcome(anchors: stored)
    for root in roots where !trusted.contains(where: { $0.der == root.der }) {
      // The same name and key as an anchor we trust (a re-issued root), or a link certificate
      // for the new root issued by one (NewWithOld).
      let vouched =
        trusted.contains { $0.subject == root.subject && $0.publicKeyDER == root.publicKeyDER }
        || offered.contains { link in
          link.der != root.der && link.subject == root.subject && link.publicKeyDER == root.publicKeyDER
            && trusted.contains { link.isIssued(by: $0) }
        }
      if vouched {
        outcome.anchors.append(root)
        outcome.added.append(root)
        trusted.append(root)
      }
    }
    if stored.isEmpty && outcome.anchors.isEmpty {
      // Nothing offered could be vouched for: keep trusting what we were given.
      outcome.anchors = configured
      outcome.added = configured
    }
    outcome.withdrawn = stored.filter { anchor in !offered.contains { $0.der == anchor.der } }
    return outcome
  }
}
