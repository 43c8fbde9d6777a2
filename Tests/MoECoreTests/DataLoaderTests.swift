import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoEIO

final class DataLoaderTests: XCTestCase {
    func file(_ count: Int) -> TokenFile {
        TokenFile(path: "memory", tokens: (0..<count).map { UInt16($0 % 251) }, vocabularySize: 256)
    }

    /// The global batch is a function of seed and step only: R ranks with B sequences each see
    /// exactly what one rank with R*B sequences sees.
    func testGlobalBatchDoesNotDependOnTheRankCount() throws {
        let batches = try TokenBatches(file: file(5000), length: 16, seed: 9)
        var wholeInputs: [Int32] = [], wholeTargets: [Int32] = []
        batches.trainingBatch(step: 3, rank: 0, batchSize: 8, inputs: &wholeInputs, targets: &wholeTargets)
        for ranks in [2, 4, 8] {
            var inputs: [Int32] = [], targets: [Int32] = []
            var joined: [Int32] = [], joinedTargets: [Int32] = []
            for rank in 0..<ranks {
                batches.trainingBatch(step: 3, rank: rank, batchSize: 8 / ranks, inputs: &inputs, targets: &targets)
                joined += inputs
                joinedTargets += targets
            }
            XCTAssertEqual(joined, wholeInputs, "\(ranks) ranks")
            XCTAssertEqual(joinedTargets, wholeTargets)
        }
        // Targets are the inputs shifted by one token.
        XCTAssertEqual(Array(wholeInputs[1..<16]), Array(wholeTargets[0..<15]))
        var other: [Int32] = [], otherTargets: [Int32] = []
        batches.trainingBatch(step: 4, rank: 0, batchSize: 8, inputs: &other, targets: &otherTargets)
        XCTAssertNotEqual(other, wholeInputs, "another step draws other windows")
    }

    /// Windows of sharded data never cross a shard boundary, every shard is used, and a list or a
    /// glob names the shards in order.
    func testShardedWindowsStayInsideTheirShard() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("moe-shards-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // Shard s holds tokens 100 s + (0..<50) in order, so a window's shard and continuity show.
        for shard in 0..<3 {
            try TokenFile.write(tokens: (0..<(40 + 30 * shard)).map { UInt16(100 * shard + $0 % 50) }, vocabularySize: 512,
                                to: "\(directory)/train_\(shard).bin")
        }
        let files = try TokenFile.read(patterns: ["\(directory)/train_*.bin"], key: "data.train")
        XCTAssertEqual(files.map { ($0.path as NSString).lastPathComponent }, ["train_0.bin", "train_1.bin", "train_2.bin"])
        let batches = try TokenBatches(files: files, length: 16, seed: 3)
        XCTAssertEqual(batches.windowCount, (40 - 16) + (70 - 16) + (100 - 16))
        var inputs: [Int32] = [], targets: [Int32] = [], seen: Set<Int32> = []
        for step in 0..<50 {
            batches.trainingBatch(step: step, rank: 0, batchSize: 8, inputs: &inputs, targets: &targets)
            for sequence in 0..<8 {
                let window = inputs[(sequence * 16)..<((sequence + 1) * 16)] + [targets[sequence * 16 + 15]]
                XCTAssertEqual(Set(window.map { $0 / 100 }).count, 1, "window crosses a shard: \(Array(window))")
                seen.insert(window.first! / 100)
            }
        }
        XCTAssertEqual(seen, [0, 1, 2], "every shard is drawn from")
        XCTAssertThrowsError(try TokenFile.read(patterns: ["\(directory)/none_*.bin"], key: "data.val")) { error in
            XCTAssertEqual("\(error)", "data.val: '\(directory)/none_*.bin' matches no file")
        }
    }

    func testEvaluationWindowsAreFixedAndSpreadOverTheFile() throws {
        let batches = try TokenBatches(file: file(10_000), length: 16, seed: 1)
        var starts: [Int32] = []
        var inputs: [Int32] = [], targets: [Int32] = []
        for index in 0..<4 {
            batches.evaluationBatch(index: index, batches: 4, rank: 0, ranks: 1, batchSize: 2, inputs: &inputs, targets: &targets)
            starts += [inputs[0], inputs[16]]
        }
        XCTAssertEqual(Set(starts).count, 8, "eight distinct windows")
        XCTAssertThrowsError(try TokenBatches(file: file(10), length: 16, seed: 1)) { error in
            XCTAssertTrue("\(error)".contains("too few"))
        }
    }

    func testTokenFileRoundTripAndVocabularyInference() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tokens-\(UUID()).bin").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try TokenFile.write(tokens: [1, 2, 50_000], vocabularySize: 0, to: path)
        let read = try TokenFile.read(path)
        XCTAssertEqual(Array(read.tokens), [1, 2, 50_000])
        XCTAssertEqual(read.vocabularySize, 50257, "GPT-2 ids without a declared vocabulary")
        try TokenFile.write(tokens: [1, 2, 200], vocabularySize: 0, to: path)
        XCTAssertEqual(try TokenFile.read(path).vocabularySize, 256)
    }
}
