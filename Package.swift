// swift-tools-version:5.10
import PackageDescription

// Targets, bottom up (arrows point down only):
//   moe (CLI) -> MoECore (numerics, model, trainer) -> MoEIO (YAML config, token files)
//                                                   -> MoEComm (communicator protocol, MPI) -> CMPI
//                                                   -> CBLAS, CDNNL (oneDNN, bfloat16 products)
// The numeric code is generic over Float/Double (Double for gradient checks) and lives in one
// module so that whole-module optimisation specialises it for Float without @inlinable noise.
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
        .systemLibrary(name: "CMPI", path: "Sources/CMPI", pkgConfig: "ompi-c",
                       providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]),
        .target(name: "MoEComm", dependencies: ["CMPI"]),
        .target(name: "MoEIO", dependencies: [.product(name: "Yams", package: "Yams")]),
        .target(name: "MoECore", dependencies: ["CBLAS", "CDNNL", "MoEComm", "MoEIO"]),
        .executableTarget(name: "moe", dependencies: [
            "MoECore", "MoEComm", "MoEIO",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "MoECoreTests", dependencies: ["MoECore", "MoEComm", "MoEIO"]),
        .testTarget(name: "MoECLITests", dependencies: ["moe", "MoEIO", "MoECore"], exclude: ["Scripts"]),
    ]
)
