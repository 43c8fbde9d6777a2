import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoEIO

final class ConfigTests: XCTestCase {
    func testOverridesAndResolvedRoundTrip() throws {
        let config = try RunConfig.load(file: nil, overrides: ["train.steps=7", "moe.capacity_factor=none", "data.val=", "train.lr=2e-3"])
        XCTAssertEqual(config.train.steps, 7)
        XCTAssertNil(config.moe.capacityFactor)
        XCTAssertEqual(config.data.val, [])
        XCTAssertEqual(config.train.learningRate, 2e-3)
        let reread = try RunConfig.fromResolved(config.yaml(), file: "resolved")
        XCTAssertEqual(reread, config, "the written config reads back to the same values")
        XCTAssertEqual(config.differingKeys(from: RunConfig()), ["moe.capacity_factor", "train.steps", "train.lr", "data.val"])
    }

    func testShippedConfigsLoad() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        for name in ["tiny", "shakespeare", "bench", "gpt2-small-moe"] {
            XCTAssertNoThrow(try RunConfig.load(file: root.appendingPathComponent("configs/\(name).yaml").path), name)
        }
        let shakespeare = try RunConfig.load(file: root.appendingPathComponent("configs/shakespeare.yaml").path)
        XCTAssertEqual(shakespeare, RunConfig(), "configs/shakespeare.yaml spells out the embedded default")
    }
}
