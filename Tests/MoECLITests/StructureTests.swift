import Foundation
import XCTest

/// The code's structural rules, checked from the code by Scripts/check-structure.py: MoECore's
/// folders reference only folders below them in the layer order docs/ARCHITECTURE.md states,
/// and no function in Sources/ is longer than 60 lines.
final class StructureTests: XCTestCase {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardized
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Scripts/check-structure.py").path

    func testTheRepositoryKeepsItsLayerOrderAndFunctionLengths() throws {
        let result = try CLI.python([Self.script, Self.repository.path])
        XCTAssertEqual(result.status, 0, (result.stdout + result.stderr))
    }

    /// The checker itself fails on an upward reference, a reference between peers and a long
    /// function (in a copy of the sources and docs).
    func testTheCheckerCatchesViolations() throws {
        let cases: [(file: String, code: String, expected: String)] = [
            ("Sources/MoECore/Tensor/Upward.swift", "func upward(_ trainer: Trainer) {}\n", "Tensor names Trainer from Training, above it"),
            ("Sources/MoECore/Conversion/Peer.swift", "func peer() { _ = RunSummary.self }\n", "from Reports, a peer"),
            ("Sources/MoECore/Tensor/Long.swift", "func long() {\n" + String(repeating: "    _ = 1\n", count: 60) + "}\n",
             "long spans 62 lines"),
        ]
        for (file, code, expected) in cases {
            let workspace = try Workspace()
            for folder in ["Sources", "docs"] {
                try FileManager.default.copyItem(at: Self.repository.appendingPathComponent(folder), to: workspace.url.appendingPathComponent(folder))
            }
            try workspace.write(file, code)
            let result = try CLI.python([Self.script, workspace.url.path])
            XCTAssertEqual(result.status, 1, "\(file): \((result.stdout + result.stderr))")
            XCTAssertTrue((result.stdout + result.stderr).contains(expected), "\(file): expected '\(expected)' in: \((result.stdout + result.stderr))")
        }
    }
}
