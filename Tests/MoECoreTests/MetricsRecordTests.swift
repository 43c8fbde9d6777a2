import Foundation
import XCTest
@testable import MoECore

/// The metrics schema round-trips through its one type: what the writer writes, the reader reads.
final class MetricsRecordTests: XCTestCase {
    func testAStepRecordRoundTripsInTheDocumentedKeyOrder() throws {
        var record = MetricsRecord(step: 7)
        record.loss = 2.5
        record.learningRate = 1e-3
        record.tokensPerSecond = 1234.5
        record.expertLoad = [[0.25, 0.75]]
        record.phase = .hard
        record.routerEntropy = [0.5, nil]
        record.trainingFlops = 3e12
        let line = record.jsonLine
        XCTAssertTrue(line.hasPrefix(#"{"step":7,"loss":2.5,"lr":0.001,"tokens_per_sec":1234.5,"expert_load":[[0.25,0.75]],"phase":"hard""#), line)
        XCTAssertTrue(line.contains(#""router_entropy":[0.5,null]"#), line)
        XCTAssertEqual(MetricsRecord(line: line), record)
        XCTAssertTrue(record.isTrainingStep)
    }

    /// A skipped step's NaN loss is written as null (JSON has no NaN) and read back as nil; the
    /// record is still a training step.
    func testANonFiniteLossIsNullAndReadsBackAsNil() throws {
        var record = MetricsRecord(step: 3)
        record.loss = .nan
        record.learningRate = 1e-3
        XCTAssertTrue(record.jsonLine.contains(#""loss":null"#), record.jsonLine)
        let read = try XCTUnwrap(MetricsRecord(line: record.jsonLine))
        XCTAssertNil(read.loss)
        XCTAssertTrue(read.isTrainingStep)
    }

    /// Lines written before the type existed (same keys, plus any the reader does not know) read
    /// the same; a line that is not a record is refused with its line number.
    func testOlderLinesReadAndMalformedLinesAreNamed() throws {
        let old = #"{"step":0,"val_loss":5.5,"train_flops":0,"future_key":1}"#
        let record = try XCTUnwrap(MetricsRecord(line: old))
        XCTAssertEqual(record.validationLoss, 5.5)
        XCTAssertFalse(record.isTrainingStep)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("metrics-\(UUID().uuidString).jsonl").path
        try (old + "\n{\"loss\": 1}\n").write(toFile: path, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try MetricsRecord.read(path)) { XCTAssertTrue("\($0)".contains("line 2"), "\($0)") }
        // Steps a run cannot have (moe compare and report used to trap on step + 1).
        for step in [Int.max, -1] {
            try "{\"step\":\(step),\"loss\":1,\"lr\":0.1}\n".write(toFile: path, atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try MetricsRecord.read(path)) { XCTAssertTrue("\($0)".contains("step \(step) is outside"), "\($0)") }
        }
    }

    /// The manifest's phase is typed; manifests written when it was a string decode the same.
    func testManifestPhaseDecodesFromOlderManifests() throws {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let fields = #""format":"swiftmoe-checkpoint","version":1,"step":4,"tokens_seen":0,"world_size":1,"vocabulary_size":256,"expert_ranks":[0],"expert_files":[null],"learning_rate":0,"optimizer_steps":{},"seed":1,"config":"","files":{}"#
        let hard = try decoder.decode(CheckpointManifest.self, from: Data(("{" + fields + #","phase":"hard"}"#).utf8))
        XCTAssertEqual(hard.phase, .hard)
        let none = try decoder.decode(CheckpointManifest.self, from: Data(("{" + fields + "}").utf8))
        XCTAssertNil(none.phase)
    }
}
