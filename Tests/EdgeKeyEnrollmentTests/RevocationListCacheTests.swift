import EdgeKeyEnrollment
import EdgeKeyTLS
import EdgeKeyTestSupport
import Foundation
import Testing

@Suite("fetching the CA's CRL: cached, verified, refreshed before it goes stale")
struct RevocationListCacheTests {
  @Test("fetched once, kept in a file, fetched again at half its validity; the held one outlives an RA that is down")
  func cachedAndRefreshed() throws {
    let ca = try TestCA()
    let ra = try RegistrationAuthority(ca: ca, password: nil, extraArguments: ["--crl-validity", "60s"])
    let anchors = try Certificate.chain(pem: ca.certificatePEM)
    let path = temporaryPath("crl") + ".pem"
    try FileManager.default.createDirectory(
      atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    let cache = try RevocationListCache(url: ra.localhostURL + "/crl", trustAnchors: anchors, cachePath: path)
    let first = try cache.current()
    #expect(cache.fetches == 1)
    #expect(first.issuer == "CN=EdgeKey Test Root CA")
    #expect(first.number != nil)
    #expect(first.nextUpdate.map { $0.timeIntervalSince(first.thisUpdate) } == 60)
    _ = try cache.current()
    #expect(cache.fetches == 1, "fresh: not fetched again")
    // Another process (a restarted device) reads the file, and fetches nothing.
    let again = try RevocationListCache(url: ra.localhostURL + "/crl", trustAnchors: anchors, cachePath: path)
    #expect(try again.current().der == first.der)
    #expect(again.fetches == 0)
    // Past half its validity it is fetched again.
    _ = try again.current(now: Date().addingTimeInterval(31))
    #expect(again.fetches == 1)
    // The RA is down: the held CRL serves while it is current, with the reason kept; past its
    // nextUpdate there is none to give.
    ra.stop()
    let held = try again.current(now: Date().addingTimeInterval(40), force: true)
    #expect(held.der == first.der || held.thisUpdate >= first.thisUpdate)
    #expect(again.lastError?.kind == .network)
    let stale = #expect(throws: EnrollmentError.self) { try again.current(now: Date().addingTimeInterval(120)) }
    #expect(stale?.kind == .network)
  }

  @Test("a CRL another CA signed, or one larger than the bound, is refused and nothing is kept")
  func refusals() throws {
    let ca = try TestCA()
    let other = try TestCA(name: "Other CA")
    // Served over TLS we trust, but signed by a CA we do not.
    let foreign = try RegistrationAuthority(ca: other, password: nil, tlsCA: ca)
    let anchors = try Certificate.chain(pem: ca.certificatePEM)
    let path = temporaryPath("crl") + ".pem"
    let cache = try RevocationListCache(url: foreign.localhostURL + "/crl", trustAnchors: anchors, cachePath: path)
    let refused = #expect(throws: EnrollmentError.self) { try cache.current() }
    #expect(refused?.kind == .malformedResponse)
    #expect(refused?.message.contains("not signed by a CA we trust") == true)
    #expect(!FileManager.default.fileExists(atPath: path))
    var small = RevocationListCache.defaultOptions
    small.maximumResponseBytes = 64
    let ra = try RegistrationAuthority(ca: ca, password: nil)
    let bounded = try RevocationListCache(url: ra.localhostURL + "/crl", trustAnchors: anchors, options: small)
    let large = #expect(throws: EnrollmentError.self) { try bounded.current() }
    #expect(large?.kind == .responseTooLarge)
  }
}
