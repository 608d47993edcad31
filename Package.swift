// swift-tools-version:6.0
// EdgeKey: device identity for Linux IoT and edge devices, with private keys held in a TPM 2.0.
import PackageDescription

let package = Package(
  name: "EdgeKey",
  products: [
    .library(name: "EdgeKey", targets: ["EdgeKey"]),
    .library(name: "EdgeKeyTPM", targets: ["EdgeKeyTPM"]),
    .library(name: "EdgeKeyCore", targets: ["EdgeKeyCore"]),
    .library(name: "EdgeKeyTLS", targets: ["EdgeKeyTLS"]),
    .library(name: "EdgeKeyMQTT", targets: ["EdgeKeyMQTT"]),
    .library(name: "EdgeKeyEnrollment", targets: ["EdgeKeyEnrollment"]),
    .library(name: "EdgeKeyRA", targets: ["EdgeKeyRA"]),
    .executable(name: "edgekey-ra", targets: ["edgekey-ra"]),
    .executable(name: "edgekey", targets: ["edgekey"]),
  ],
  targets: [
    // System libraries from Debian's -dev packages: module maps only.
    .systemLibrary(
      name: "CTSS2", path: "Sources/CTSS2", pkgConfig: "tss2-esys",
      providers: [.apt(["libtss2-dev"])]),
    .systemLibrary(
      name: "COpenSSL", path: "Sources/COpenSSL", pkgConfig: "openssl",
      providers: [.apt(["libssl-dev"])]),
    .systemLibrary(
      name: "CMosquitto", path: "Sources/CMosquitto", pkgConfig: "libmosquitto",
      providers: [.apt(["libmosquitto-dev"])]),
    .systemLibrary(
      name: "CSQLite", path: "Sources/CSQLite", pkgConfig: "sqlite3",
      providers: [.apt(["libsqlite3-dev"])]),
    .systemLibrary(
      name: "CCurl", path: "Sources/CCurl", pkgConfig: "libcurl",
      providers: [.apt(["libcurl4-openssl-dev"])]),

    // The C core shared by the OpenSSL provider, the C API and the Swift TPM layer:
    // the process's ESAPI context, key load and sign, TSS2 PRIVATE KEY files.
    .target(
      name: "CEdgeKeyProvider",
      dependencies: ["CTSS2", "COpenSSL"],
      path: "Sources/CEdgeKeyProvider",
      // A C target does not import its dependencies' module maps, so it names their libraries.
      linkerSettings: [
        .linkedLibrary("tss2-esys"), .linkedLibrary("tss2-tctildr"), .linkedLibrary("tss2-mu"),
        .linkedLibrary("tss2-rc"), .linkedLibrary("ssl"), .linkedLibrary("crypto"),
      ]
    ),

    .target(name: "EdgeKeyCore", dependencies: ["CSQLite"], path: "Sources/EdgeKeyCore"),
    .target(
      name: "EdgeKeyTPM",
      dependencies: ["CTSS2", "CEdgeKeyProvider", "EdgeKeyCore"],
      path: "Sources/EdgeKeyTPM"
    ),
    .target(
      name: "EdgeKeyTLS",
      dependencies: ["COpenSSL", "CEdgeKeyProvider", "EdgeKeyTPM", "EdgeKeyCore"],
      path: "Sources/EdgeKeyTLS"
    ),
    .target(
      name: "EdgeKeyMQTT",
      dependencies: ["CMosquitto", "EdgeKeyTLS", "EdgeKeyCore"],
      path: "Sources/EdgeKeyMQTT"
    ),
    // HTTPS with the TPM identity through libcurl (EST enrollment; usable from C daemons).
    .target(
      name: "CEdgeKeyHTTP",
      dependencies: ["CEdgeKeyProvider", "CCurl"],
      path: "Sources/CEdgeKeyHTTP",
      linkerSettings: [.linkedLibrary("curl")]
    ),
    .target(
      name: "EdgeKeyEnrollment",
      dependencies: ["CEdgeKeyHTTP", "COpenSSL", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyCore"],
      path: "Sources/EdgeKeyEnrollment"
    ),
    // The facade for daemon authors: one `Device` owning TPM, credentials, renewal and MQTT.
    .target(
      name: "EdgeKey",
      dependencies: ["EdgeKeyEnrollment", "EdgeKeyMQTT", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyCore"],
      path: "Sources/EdgeKey"
    ),
    // The registration authority: an EST server signing with a CA in files.
    .target(
      name: "EdgeKeyRA",
      dependencies: ["COpenSSL", "CEdgeKeyProvider", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyCore"],
      path: "Sources/EdgeKeyRA"
    ),
    .executableTarget(
      name: "edgekey-ra",
      dependencies: ["EdgeKeyRA", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyCore", "CEdgeKeyProvider"],
      path: "Sources/edgekey-ra"
    ),
    .executableTarget(
      name: "edgekey",
      dependencies: ["EdgeKey", "EdgeKeyTPM", "EdgeKeyTLS", "EdgeKeyMQTT", "EdgeKeyEnrollment", "EdgeKeyCore"],
      path: "Sources/edgekey"
    ),

    // Examples, built with the package so that they keep compiling.
    .executableTarget(
      name: "edgekey-telemetry",
      dependencies: ["EdgeKey"],
      path: "Examples/TelemetryDaemon"
    ),

    // Benchmarks: figures side by side with their anchors in one run.
    .executableTarget(
      name: "edgekey-bench",
      dependencies: [
        "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyMQTT", "EdgeKeyEnrollment", "EdgeKeyRA", "EdgeKeyCore",
        "EdgeKeyTestSupport", "COpenSSL", "CEdgeKeyBenchAnchor",
      ],
      path: "Benchmarks/EdgeKeyBench"
    ),
    // The MQTT benchmark's anchor: a plain libmosquitto publisher in C.
    .target(
      name: "CEdgeKeyBenchAnchor",
      dependencies: ["CMosquitto", "COpenSSL"],
      path: "Benchmarks/CAnchor",
      linkerSettings: [.linkedLibrary("mosquitto"), .linkedLibrary("ssl"), .linkedLibrary("crypto")]
    ),

    // Fuzzing: one target per parser of outside input (Tests/Fuzz/Targets), run by libFuzzer
    // through edgekey-fuzz (scripts/fuzz) and replayed from the corpus by the test suite.
    .target(
      name: "EdgeKeyFuzzTargets",
      dependencies: ["EdgeKeyCore", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyEnrollment", "EdgeKeyRA", "CEdgeKeyHTTP"],
      path: "Tests/Fuzz/Targets"
    ),
    .executableTarget(
      name: "edgekey-fuzz",
      dependencies: ["EdgeKeyFuzzTargets"],
      path: "Tests/Fuzz/Driver"
    ),

    // Test harness: starts swtpm (and later mosquitto, the RA) on free loopback ports.
    .target(
      name: "EdgeKeyTestSupport",
      dependencies: ["EdgeKeyCore", "EdgeKeyMQTT", "COpenSSL", "CEdgeKeyTestHelpers"],
      path: "Tests/Support",
      exclude: ["Peers"]  // test peers' launchers (Python), run by the harness
    ),
    // C helpers for what Swift cannot do safely itself (fork in a threaded test process).
    .target(
      name: "CEdgeKeyTestHelpers",
      dependencies: ["CEdgeKeyProvider"],
      path: "Tests/CHelpers"
    ),
    .testTarget(
      name: "EdgeKeyTPMTests",
      dependencies: ["EdgeKeyTPM", "EdgeKeyTestSupport", "CEdgeKeyTestHelpers", "CEdgeKeyProvider"],
      path: "Tests/EdgeKeyTPMTests"
    ),
    .testTarget(
      name: "EdgeKeyTLSTests",
      dependencies: [
        "EdgeKeyTLS", "EdgeKeyMQTT", "EdgeKeyTPM", "EdgeKeyTestSupport", "COpenSSL", "CEdgeKeyProvider",
      ],
      path: "Tests/EdgeKeyTLSTests"
    ),
    .testTarget(
      name: "EdgeKeyEnrollmentTests",
      dependencies: [
        "EdgeKey", "EdgeKeyEnrollment", "EdgeKeyRA", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyMQTT", "EdgeKeyCore",
        "EdgeKeyTestSupport", "EdgeKeyFuzzTargets",
        "COpenSSL", "CEdgeKeyProvider",
      ],
      path: "Tests/EdgeKeyEnrollmentTests"
    ),
    .testTarget(
      name: "EdgeKeyRATests",
      dependencies: ["EdgeKeyRA", "EdgeKeyTLS", "EdgeKeyTPM", "EdgeKeyCore", "EdgeKeyTestSupport", "COpenSSL"],
      path: "Tests/EdgeKeyRATests"
    ),
    .testTarget(
      name: "EdgeKeyCLITests",
      dependencies: ["EdgeKeyTestSupport", "EdgeKeyCore", "EdgeKeyMQTT", "EdgeKeyEnrollment", "COpenSSL"],
      path: "Tests/EdgeKeyCLITests"
    ),
  ],
  swiftLanguageModes: [.v6]
)
