import Foundation
#if canImport(Glibc)
import Glibc
#endif
import XCTest
import MoEIO

/// Every malformed config or data file ends in a one-line error that names the culprit and a
/// non-zero exit status, never a crash or a hang.
final class BadInputTests: XCTestCase {
    struct Case {
        var name: String
        var config: String?            // written to bad.yaml when set
        var arguments: [String]        // after `moe`
        var expected: String           // must appear in the error line
        var setup: ((Workspace) throws -> Void)? = nil
    }

    static let good = Workspace.tinyConfig

    /// Nine to the ninth list elements in eleven lines.
    static let aliasBomb = "x:\n  a: &a [1,1,1,1,1,1,1,1,1]\n" + (1...8).map { level in
        "  b\(level): &b\(level) [" + Array(repeating: level == 1 ? "*a" : "*b\(level - 1)", count: 9).joined(separator: ",") + "]\n"
    }.joined()

    /// A negative number given to a numeric option is named by the option's own check (it used
    /// to be read as an unknown flag: "Missing value for ...").
    func testNegativeOptionValuesAreNamed() throws {
        let workspace = try Workspace()
        let cases: [([String], String)] = [
            (["generate", "--checkpoint", "none", "--tokens", "-1"], "--tokens must be >= 0"),
            (["generate", "--checkpoint", "none", "--temperature", "-1"], "--temperature must be >= 0"),
            (["train", "--stop-at", "-1"], "--stop-at must be >= 1"),
            (["bench", "--steps", "-2"], "--steps must be > 0"),
        ]
        for (arguments, expected) in cases {
            let result = try CLI.run(arguments, in: workspace.url)
            XCTAssertNotEqual(result.status, 0, "\(arguments)")
            XCTAssertTrue(result.stderr.split(separator: "\n").first?.contains(expected) == true, "\(arguments): \(result.stderr)")
        }
    }

    func testMalformedInputsGiveOneLineErrors() throws {
        let train = ["train", "--config", "bad.yaml", "--run-dir", "run"]
        var header = [Int32](repeating: 0, count: 256)
        header[0] = TokenFile.magic; header[1] = TokenFile.version; header[2] = 1000
        let headerBytes = header.withUnsafeBytes { Array($0) }
        let cases: [Case] = [
            Case(name: "unknown section", config: Self.good + "\nbogus: {a: 1}\n", arguments: train, expected: "unknown config key 'bogus'"),
            Case(name: "unknown key", config: Self.good.replacingOccurrences(of: "steps: 12", with: "stepz: 12"),
                 arguments: train, expected: "train.stepz"),
            Case(name: "wrong type", config: Self.good.replacingOccurrences(of: "steps: 12", with: "steps: many"),
                 arguments: train, expected: "config key 'train.steps': got 'many', expected an integer"),
            Case(name: "float for an integer", config: Self.good.replacingOccurrences(of: "width: 16", with: "width: 16.5"),
                 arguments: train, expected: "model.width"),
            Case(name: "bool of wrong type", config: Self.good + "\n", arguments: train + ["--set", "model.tie_embeddings=3"],
                 expected: "model.tie_embeddings"),
            Case(name: "top_k > experts", config: Self.good, arguments: train + ["--set", "moe.top_k=5"], expected: "moe.top_k (5) cannot exceed moe.experts (4)"),
            Case(name: "heads do not divide width", config: Self.good, arguments: train + ["--set", "model.heads=3"],
                 expected: "model.heads (3) must divide model.width (16)"),
            Case(name: "unknown gate", config: Self.good, arguments: train + ["--set", "moe.gate=magic"], expected: "moe.gate"),
            Case(name: "switch with top-2", config: Self.good, arguments: train + ["--set", "moe.gate=switch"], expected: "moe.top_k"),
            Case(name: "zero batch", config: Self.good, arguments: train + ["--set", "train.batch_size=0"], expected: "train.batch_size"),
            Case(name: "negative capacity factor", config: Self.good, arguments: train + ["--set", "moe.capacity_factor=-1"],
                 expected: "moe.capacity_factor"),
            Case(name: "min_lr above lr", config: Self.good, arguments: train + ["--set", "train.min_lr=1"], expected: "train.min_lr"),
            Case(name: "override without =", config: Self.good, arguments: train + ["--set", "train.steps"], expected: "--set 'train.steps'"),
            Case(name: "override of an unknown section", config: Self.good, arguments: train + ["--set", "optimizer.lr=1"],
                 expected: "unknown config key 'optimizer'"),
            Case(name: "missing config file", config: nil, arguments: ["train", "--config", "nope.yaml"], expected: "config file 'nope.yaml': cannot read it"),
            Case(name: "invalid YAML", config: "model: {width: [1, 2\n", arguments: train, expected: "not valid YAML"),
            Case(name: "config is a list", config: "- 1\n- 2\n", arguments: train, expected: "must be a mapping"),
            Case(name: "section is a scalar", config: "train: 5\n", arguments: train, expected: "'train' must be a mapping"),
            Case(name: "missing data file", config: Self.good, arguments: train + ["--set", "data.train=data/none.bin"],
                 expected: "token file 'data/none.bin': cannot read it"),
            Case(name: "truncated token file", config: Self.good, arguments: train + ["--set", "data.train=data/cut.bin"],
                 expected: "token file 'data/cut.bin': header declares 1000 tokens",
                 setup: { try $0.write("data/cut.bin", bytes: headerBytes + [UInt8](repeating: 65, count: 100)) }),
            Case(name: "file shorter than a header", config: Self.good, arguments: train + ["--set", "data.val=data/short.bin"],
                 expected: "token file 'data/short.bin': 10 bytes is shorter than the 1024-byte header",
                 setup: { try $0.write("data/short.bin", bytes: [UInt8](repeating: 1, count: 10)) }),
            Case(name: "bad magic", config: Self.good, arguments: train + ["--set", "data.train=data/text.bin"],
                 expected: "bad magic number",
                 setup: { try $0.write("data/text.bin", bytes: [UInt8](repeating: 65, count: 2048)) }),
            Case(name: "token outside the declared vocabulary", config: Self.good, arguments: train + ["--set", "data.train=data/vocab.bin"],
                 expected: "outside the declared vocabulary",
                 setup: { try TokenFile.write(tokens: [1, 2, 300], vocabularySize: 256, to: $0.path("data/vocab.bin")) }),
            Case(name: "too few tokens for the context", config: Self.good, arguments: train + ["--set", "data.train=data/few.bin"],
                 expected: "too few for one sequence",
                 setup: { try TokenFile.write(tokens: [1, 2, 3], vocabularySize: 256, to: $0.path("data/few.bin")) }),
            Case(name: "eval of a missing checkpoint", config: nil, arguments: ["eval", "--checkpoint", "nowhere"],
                 expected: "checkpoint 'nowhere'"),
            Case(name: "prepare of a missing input", config: nil, arguments: ["prepare", "--input", "missing.txt", "--output", "out"],
                 expected: "prepare: input 'missing.txt' does not exist"),
            // Hostile YAML: the library would expand the aliases until memory runs out, recurse
            // until the stack overflows, and let the second `train:` replace the first.
            Case(name: "alias bomb", config: Self.aliasBomb, arguments: train, expected: "uses a YAML anchor or alias"),
            Case(name: "deep nesting", config: "model: " + String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000) + "\n",
                 arguments: train, expected: "nests deeper than"),
            Case(name: "duplicate section", config: Self.good + "\ntrain:\n  steps: 5\n", arguments: train, expected: "key 'train' appears twice"),
            Case(name: "duplicate key", config: "train:\n  steps: 3\n  steps: 5\n", arguments: train, expected: "key 'train.steps' appears twice"),
            // A complex key (found by the config fuzzer): the YAML library force-unwraps key strings.
            Case(name: "complex key", config: "? vfraction: 0\ndata:\n  train: x\n", arguments: train, expected: "a key at the top level is not a plain value"),
            Case(name: "merge key", config: "train:\n  <<: {steps: 3}\n", arguments: train, expected: "a key at 'train' is not a plain value"),
            // Not regular files: a FIFO would block the read forever.
            Case(name: "FIFO as config", config: nil, arguments: ["train", "--config", "pipe"], expected: "config file 'pipe': cannot read it (a FIFO",
                 setup: { _ = mkfifo($0.path("pipe"), 0o600) }),
            Case(name: "directory as config", config: nil, arguments: ["train", "--config", "data"], expected: "config file 'data': cannot read it (a directory"),
            Case(name: "FIFO as token file", config: Self.good, arguments: train + ["--set", "data.train=pipe"],
                 expected: "token file 'pipe': cannot read it: it is a FIFO", setup: { _ = mkfifo($0.path("pipe"), 0o600) }),
            Case(name: "FIFO to prepare", config: nil, arguments: ["prepare", "--input", "pipe", "--output", "out"],
                 expected: "prepare: input 'pipe' is a FIFO", setup: { _ = mkfifo($0.path("pipe"), 0o600) }),
            // Sizes no machine holds: refused from the config before anything is allocated (they
            // used to end in "Fatal error: failed to allocate").
            Case(name: "huge hidden size", config: Self.good, arguments: train + ["--set", "model.ffn_hidden=2000000000"],
                 expected: "more than this machine's"),
            Case(name: "token file declaring a huge vocabulary", config: Self.good, arguments: train + ["--set", "data.train=data/huge.bin"],
                 expected: "vocabulary 2147483647), more than this machine's",
                 setup: { try TokenFile.write(tokens: Workspace.text(lines: 40, seed: 3), vocabularySize: Int(Int32.max), to: $0.path("data/huge.bin")) }),
            // Reports: steps no run can have (compare used to trap on step + 1).
            Case(name: "compare of an impossible step", config: nil, arguments: ["compare", "a", "a"], expected: "step 9223372036854775807 is outside",
                 setup: { workspace in
                     try FileManager.default.createDirectory(atPath: workspace.path("a"), withIntermediateDirectories: true)
                     try workspace.write("a/metrics.jsonl", "{\"step\":9223372036854775807,\"loss\":1,\"lr\":0.1}\n")
                 }),
        ]
        XCTAssertGreaterThanOrEqual(cases.count, 15)
        for testCase in cases {
            let workspace = try Workspace()
            if let config = testCase.config { try workspace.write("bad.yaml", config) }
            try testCase.setup?(workspace)
            let result = try CLI.run(testCase.arguments, in: workspace.url)
            let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
            XCTAssertNotEqual(result.status, 0, "\(testCase.name): exit status 0")
            XCTAssertEqual(lines.count, 1, "\(testCase.name): expected one error line, got \(result.stderr)")
            XCTAssertTrue(result.stderr.contains(testCase.expected), "\(testCase.name): '\(result.stderr)' lacks '\(testCase.expected)'")
            XCTAssertFalse(result.stderr.contains("Fatal error"), "\(testCase.name): crashed: \(result.stderr)")
        }
    }
}
