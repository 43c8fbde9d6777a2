import Foundation
import XCTest

/// The fuzz targets' seed corpus (Tests/Fuzz/corpus), replayed through the plain build of
/// moe-fuzz: every seed and every past finding added there must parse or be refused, never trap.
/// (launch/fuzz.sh runs the same targets under libFuzzer and AddressSanitizer.)
final class FuzzCorpusTests: XCTestCase {
    func testEverySeedReplaysCleanly() throws {
        let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../Fuzz/corpus").standardized
        let binary = CLI.executable.deletingLastPathComponent().appendingPathComponent("moe-fuzz")
        let targets = try FileManager.default.contentsOfDirectory(atPath: corpus.path).sorted()
        XCTAssertEqual(targets, ["config", "manifest", "safetensors", "token_file", "tokenizer"])
        for target in targets {
            let seeds = try FileManager.default.contentsOfDirectory(atPath: corpus.appendingPathComponent(target).path).sorted()
            XCTAssertFalse(seeds.isEmpty, target)
            let result = try CLI.run([target] + seeds.map { corpus.appendingPathComponent(target).appendingPathComponent($0).path },
                                     in: corpus, executable: binary)
            XCTAssertEqual(result.status, 0, "\(target): \(result.stdout) \(result.stderr)")
            XCTAssertTrue(result.stdout.contains("\(target): \(seeds.count) inputs replayed"), result.stdout)
        }
    }
}
