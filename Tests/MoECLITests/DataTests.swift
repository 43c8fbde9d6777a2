import Foundation
import XCTest
import MoEIO

/// Sharded, memory-mapped training data through the binary.
final class DataTests: XCTestCase {
    /// Writes a token file of `count` tokens repeating `pattern`, streaming (no whole-file buffer).
    func writeShard(_ path: String, count: Int, pattern: [UInt16]) throws {
        var header = [Int32](repeating: 0, count: 256)
        header[0] = TokenFile.magic; header[1] = TokenFile.version; header[2] = Int32(count); header[3] = 256
        FileManager.default.createFile(atPath: path, contents: header.withUnsafeBytes { Data($0) })
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        defer { try? handle.close() }
        try handle.seekToEnd()
        let block = Data((0..<(1 << 20)).flatMap { index -> [UInt8] in
            let token = pattern[index % pattern.count]
            return [UInt8(token & 0xff), UInt8(token >> 8)]
        })
        var written = 0
        while written < count {
            let tokens = min(1 << 20, count - written)
            try handle.write(contentsOf: block.prefix(2 * tokens))
            written += tokens
        }
    }

    /// 1 GiB of shards (8 x 64M tokens) against 10 MB: the peak RSS of the larger of 2 ranks grows
    /// by less than 50 MB (the files are mapped, and the reading passes release their pages).
    /// Uses the release binary when launch/test.sh provides it (the debug build reads 1 GiB slowly).
    func testGigabyteOfShardsAddsLittleMemory() throws {
        _ = try CLI.requireMPI()
        let binary = CLI.fastExecutable
        let workspace = try Workspace()
        try workspace.write("c.yaml", Workspace.tinyConfig)
        let text = Workspace.text(lines: 50, seed: 3)
        try FileManager.default.createDirectory(atPath: workspace.path("big"), withIntermediateDirectories: true)
        for shard in 0..<8 { try writeShard(workspace.path("big/train_\(shard).bin"), count: 1 << 26, pattern: text) }
        try writeShard(workspace.path("data/small.bin"), count: 5_000_000, pattern: text)
        func peak(_ data: String) throws -> Double {
            let result = try CLI.mpirun(ranks: 2, ["bench", "--config", "c.yaml", "--steps", "2", "--warmup", "1", "--precision", "fp32",
                                                   "--set", "data.train=\(data)"], in: workspace.url, timeout: 600, executable: binary)
            XCTAssertEqual(result.status, 0, result.stderr)
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], result.stdout)
            XCTAssertEqual(object["data"] as? String, data)
            return try XCTUnwrap(object["peak_rss_mib"] as? Double)
        }
        let small = try peak("data/small.bin"), large = try peak("big/train_*.bin")
        print("peak RSS: 10 MB dataset \(small) MiB, 1 GiB of shards \(large) MiB")
        XCTAssertLessThan(large - small, 50 * 1e6 / 1_048_576, "1 GiB of shards: \(large) MiB vs \(small) MiB")
    }

    /// An empty glob and a corrupted shard stop the run with one line naming the culprit.
    func testEmptyGlobAndCorruptShardAreOneLineErrors() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Workspace.tinyConfig)
        try FileManager.default.createDirectory(atPath: workspace.path("shards"), withIntermediateDirectories: true)
        for shard in 0..<3 { try writeShard(workspace.path("shards/train_\(shard).bin"), count: 20_000, pattern: Workspace.text(lines: 20, seed: 4)) }
        let good = try CLI.run(["train", "--config", "c.yaml", "--run-dir", "good", "--set", "data.train=shards/train_*.bin"], in: workspace.url)
        XCTAssertEqual(good.status, 0, good.stderr)
        // Truncate the middle shard.
        let middle = workspace.path("shards/train_1.bin")
        let bytes = try XCTUnwrap(FileManager.default.contents(atPath: middle))
        try bytes.prefix(bytes.count - 100).write(to: URL(fileURLWithPath: middle))
        for (setting, expected) in [("data.train=shards/train_*.bin", "token file 'shards/train_1.bin': header declares"),
                                    ("data.train=nothing/here_*.bin", "data.train: 'nothing/here_*.bin' matches no file")] {
            let result = try CLI.run(["train", "--config", "c.yaml", "--run-dir", "bad", "--set", setting], in: workspace.url)
            XCTAssertEqual(result.status, 1, result.stderr)
            XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, result.stderr)
            XCTAssertTrue(result.stderr.contains(expected), result.stderr)
        }
    }
}
