import Foundation
import XCTest
import MoEIO

/// `moe prepare`'s success paths: the split it promises, checked byte for byte.
final class PrepareTests: XCTestCase {
    func tokens(_ workspace: Workspace, _ relative: String) throws -> [UInt8] {
        try TokenFile.read(workspace.path(relative)).tokens.map { UInt8($0) }
    }

    /// Ten documents `doc0.txt` ... `doc9.txt`, each a few distinct lines.
    func documents(_ workspace: Workspace, folder: String, count: Int) throws -> [[UInt8]] {
        try FileManager.default.createDirectory(atPath: workspace.path(folder), withIntermediateDirectories: true)
        return try (0..<count).map { index in
            let text = (0..<(3 + index)).map { "document \(index) line \($0)\n" }.joined()
            try workspace.write("\(folder)/doc\(index).txt", text)
            return Array(text.utf8)
        }
    }

    /// Several files: the split is by file. With --val-fraction 0.2 of 10 files, the two at
    /// evenly spaced positions of the sorted list (2 and 7) form val.bin; the other eight, in
    /// order, train.bin. Hidden files in the folder are ignored.
    func testSeveralFilesAreSplitByFile() throws {
        let workspace = try Workspace()
        let docs = try documents(workspace, folder: "corpus", count: 10)
        try workspace.write("corpus/.hidden", "never read\n")
        let result = try CLI.run(["prepare", "--input", "corpus", "--output", "out", "--val-fraction", "0.2"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.contains("train: 8 files") && result.stdout.contains("val: 2 files"), result.stdout)
        XCTAssertEqual(try tokens(workspace, "out/val.bin"), docs[2] + docs[7])
        XCTAssertEqual(try tokens(workspace, "out/train.bin"), [0, 1, 3, 4, 5, 6, 8, 9].flatMap { docs[$0] })
    }

    /// One file: split at the first line boundary after (1 - fraction) of its bytes, so the two
    /// halves concatenate back to the file and val.bin starts on a new line.
    func testOneFileIsSplitAtALineBoundary() throws {
        let workspace = try Workspace()
        let text = (0..<40).map { "line number \($0) of the only file\n" }.joined()
        try workspace.write("one.txt", text)
        let result = try CLI.run(["prepare", "--input", "one.txt", "--output", "out", "--val-fraction", "0.25"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let train = try tokens(workspace, "out/train.bin"), val = try tokens(workspace, "out/val.bin")
        XCTAssertEqual(train + val, Array(text.utf8), "the split loses or adds nothing")
        XCTAssertEqual(train.last, UInt8(ascii: "\n"), "the cut is at a line boundary")
        XCTAssertGreaterThanOrEqual(train.count, Int(0.75 * Double(text.utf8.count)))
        XCTAssertLessThan(train.count, Int(0.75 * Double(text.utf8.count)) + 40, "the cut is the first boundary after 75%")
    }

    /// --val-input names the validation files explicitly (overriding --val-fraction); an input
    /// folder that also contains them does not put them into training.
    func testValInputOverridesTheFraction() throws {
        let workspace = try Workspace()
        let docs = try documents(workspace, folder: "corpus", count: 4)
        let result = try CLI.run(["prepare", "--input", "corpus", "--val-input", "corpus/doc1.txt", "--output", "out",
                                  "--val-fraction", "0.5"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(try tokens(workspace, "out/val.bin"), docs[1])
        XCTAssertEqual(try tokens(workspace, "out/train.bin"), docs[0] + docs[2] + docs[3])
    }
}
