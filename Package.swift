// swift-tools-version:5.10
import PackageDescription

// Targets, bottom up (arrows point down only):
//   moe (CLI) -> MoECore (numerics, model, trainer) -> MoEIO (YAML config, token files)
//                                                   -> MoEComm (communicator protocol, MPI) -> CMPI
//                                                   -> CBLAS, CDNNL (oneDNN products), CVectorMath, CDirectIO
// The numeric code is generic over Float/Double (Double for gradient checks) and lives in one
// module so that whole-module optimisation specialises it for Float without @inlinable noise.

// The element-wise kernels are SIMD16<Float> code. Compiled for the build machine's CPU (AVX-512
// where it has it) instead of baseline x86-64 (SSE2) they run up to twice as fast, with the same
// results (Swift does not contract a * b + c into a fused multiply-add). Build with
// MOE_TARGET_CPU=x86-64 (or a named CPU) for a binary that must run on other nodes than the one
// that built it; MOE_TARGET_CPU= (empty) passes no flag, as a package that depends on MoECore
// needs (SwiftPM refuses unsafe flags in dependencies).
// Release builds also drop the run-time checks of exclusive access (debug builds, which the tests
// run, keep them): the routing policies' per-token loops write arrays held by classes, and each
// write paid a checked access (swift_beginAccess/endAccess, about 0.8% of a step's cycles).
let targetCPU = Context.environment["MOE_TARGET_CPU"] ?? "native"
let numericSettings: [SwiftSetting] = targetCPU.isEmpty ? [] : [
    .unsafeFlags(["-target-cpu", targetCPU]),
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]
let package = Package(
    name: "SwiftMoE",
    products: [
        .executable(name: "moe", targets: ["moe"]),
        .library(name: "MoECore", targets: ["MoECore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
    ],
    targets: [
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS", pkgConfig: "openblas",
                       providers: [.apt(["libopenblas-dev"])]),
        // oneDNN has no pkg-config file in Debian; its header is on the default include path.
        .systemLibrary(name: "CDNNL", path: "Sources/CDNNL", providers: [.apt(["libdnnl-dev"])]),
        // Vector square root and narrowing, which Swift's SIMD types only do lane by lane; the
        // SHA instructions for checkpoint digests.
        .systemLibrary(name: "CVectorMath", path: "Sources/CVectorMath"),
        // O_DIRECT, which Swift's Glibc module hides (checkpoint files past the page cache).
        .systemLibrary(name: "CDirectIO", path: "Sources/CDirectIO"),
        .systemLibrary(name: "CMPI", path: "Sources/CMPI", pkgConfig: "ompi-c",
                       providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]),
        .target(name: "MoEComm", dependencies: ["CMPI"]),
        .target(name: "MoEIO", dependencies: [.product(name: "Yams", package: "Yams")]),
        .target(name: "MoECore", dependencies: ["CBLAS", "CDNNL", "CVectorMath", "CDirectIO", "MoEComm", "MoEIO"], swiftSettings: numericSettings),
        .executableTarget(name: "moe", dependencies: [
            "MoECore", "MoEComm", "MoEIO",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Fuzz targets of the parsers of untrusted bytes (launch/fuzz.sh builds it with libFuzzer).
        .executableTarget(name: "moe-fuzz", dependencies: ["MoECore", "MoEIO"], swiftSettings: [.unsafeFlags(["-parse-as-library"])]),
        // Ranks as threads of one process: only tests need it, so it ships in no product.
        .target(name: "MoETestSupport", dependencies: ["MoEComm"], path: "Tests/MoETestSupport"),
        .testTarget(name: "MoECoreTests", dependencies: ["MoECore", "MoEComm", "MoEIO", "MoETestSupport"]),
        .testTarget(name: "MoECLITests", dependencies: ["moe", "MoEIO", "MoECore"], exclude: ["Scripts"]),
    ]
)
