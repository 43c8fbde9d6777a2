import Foundation
import XCTest
import MoEIO

final class ReferenceConfigTests: XCTestCase {
    /// configs/reference.yaml documents every key once; it must be exactly what the binary prints.
    func testReferenceConfigIsCurrent() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let printed = try CLI.run(["train", "--print-config"], in: root)
        XCTAssertEqual(printed.status, 0, printed.stderr)
        let reference = try String(contentsOf: root.appendingPathComponent("configs/reference.yaml"), encoding: .utf8)
        let body = reference.split(separator: "\n", omittingEmptySubsequences: false).drop { $0.hasPrefix("# Every") || $0.hasPrefix("# Generated") }
        XCTAssertEqual(body.joined(separator: "\n"), printed.stdout,
                       "regenerate configs/reference.yaml (see its first lines)")
    }

    /// Every shipped config loads and validates (a renamed or removed key would fail here).
    func testEveryShippedConfigLoads() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let names = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("configs").path).filter { $0.hasSuffix(".yaml") }
        XCTAssertTrue(names.contains("llama-moe.yaml"))
        for name in names {
            let printed = try CLI.run(["train", "--config", "configs/\(name)", "--print-config"], in: root)
            XCTAssertEqual(printed.status, 0, "\(name): \(printed.stderr)")
        }
    }
}
