import Foundation
import XCTest
@testable import MoECore

/// A metrics line is written whole or not at all: a full disk is an error the run reports, not
/// a trap (FileHandle.write used to trap on ENOSPC) and not a cut line.
final class MetricsLogTests: XCTestCase {
    func testAFullDiskIsAnErrorAndLeavesNoCutLine() throws {
        let log = try MetricsLog(path: "/dev/full", resumeStep: nil)   // every write: ENOSPC
        var record = MetricsRecord(step: 1)
        record.loss = 2
        XCTAssertThrowsError(try log.write(record)) { XCTAssertTrue("\($0)".contains("No space left on device"), "\($0)") }
    }

    func testLinesAreAppendedWholeAndResumeDropsLaterSteps() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("metrics-\(UUID().uuidString).jsonl").path
        var log: MetricsLog? = try MetricsLog(path: path, resumeStep: nil)
        for step in 0..<4 { try log?.write(MetricsRecord(step: step)) }
        log = try MetricsLog(path: path, resumeStep: 2)
        try log?.write(MetricsRecord(step: 2))
        log = nil
        XCTAssertEqual(try MetricsRecord.read(path).map(\.step), [0, 1, 2])
    }
}
