import Foundation
import XCTest
import MoEIO

/// `moe prepare --tokenizer bpe`, then training, eval and generate on its tokens.
final class TokenizerCLITests: XCTestCase {
    /// Documents for prepare: training works of play-like lines, and a validation work that
    /// repeats a word no training text has (so a tokenizer learned on it would have merges for it).
    func corpus(_ workspace: Workspace) throws {
        try FileManager.default.createDirectory(atPath: workspace.path("corpus"), withIntermediateDirectories: true)
        for index in 0..<4 {
            try workspace.write("corpus/work\(index).txt", String(decoding: Workspace.text(lines: 150, seed: UInt64(index + 1)).map { UInt8($0) }, as: UTF8.self))
        }
        try workspace.write("heldout.txt", String(repeating: "ZYZZYVA quixotically! ", count: 300))
    }

    /// The number just after (or just before) `marker` in `text`.
    func number(in text: String, after marker: String) throws -> Double {
        let rest = try XCTUnwrap(text.range(of: marker).map { text[$0.upperBound...] }, "no '\(marker)' in \(text)")
        return try XCTUnwrap(Double(rest.prefix { "0123456789.".contains($0) }), text)
    }

    func number(in text: String, before marker: String) throws -> Double {
        let head = try XCTUnwrap(text.range(of: marker).map { text[..<$0.lowerBound] }, "no '\(marker)' in \(text)")
        return try XCTUnwrap(Double(String(head.reversed().prefix { "0123456789.".contains($0) }.reversed())), text)
    }

    func testBPEPrepareTrainEvalGenerate() throws {
        let workspace = try Workspace()
        try corpus(workspace)
        var result = try CLI.run(["prepare", "--input", "corpus", "--val-input", "heldout.txt", "--output", "bpe",
                                  "--tokenizer", "bpe", "--vocab-size", "300"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.contains("BPE vocabulary 300"), result.stdout)
        let tokenizer = try BytePairEncoding.read(json: try Data(contentsOf: URL(fileURLWithPath: workspace.path("bpe/tokenizer.json"))), path: "")
        XCTAssertEqual(tokenizer.vocabularySize, 300)
        XCTAssertFalse(tokenizer.tokenBytes.contains { String(decoding: $0, as: UTF8.self).contains("ZY") || String(decoding: $0, as: UTF8.self).contains("qui") },
                       "learned on the validation text")
        // The token files decode back to the text, and carry the vocabulary.
        let val = try TokenFile.read(workspace.path("bpe/val.bin"))
        XCTAssertEqual(val.vocabularySize, 300)
        XCTAssertEqual(String(decoding: tokenizer.decode(val.tokens.map(Int32.init)), as: UTF8.self), String(repeating: "ZYZZYVA quixotically! ", count: 300))

        try workspace.write("tiny.yaml", Workspace.tinyConfig.replacingOccurrences(of: "data/train.bin, val: data/val.bin", with: "bpe/train.bin, val: bpe/val.bin"))
        result = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "run"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.contains("vocabulary 300"), result.stdout)
        let saved = workspace.path("run/checkpoints/step_00000012/tokenizer.json")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: saved)), try Data(contentsOf: URL(fileURLWithPath: workspace.path("bpe/tokenizer.json"))))
        XCTAssertTrue(try String(contentsOfFile: workspace.path("run/checkpoints/step_00000012/manifest.json"), encoding: .utf8).contains("\"tokenizer.json\""))

        result = try CLI.run(["eval", "--checkpoint", "run", "--data", "bpe/train.bin"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let line = result.stdout + result.stderr
        let loss = try number(in: line, after: "val_loss ")
        let perByte = try number(in: line, before: " nats per byte")
        let bytesPerToken = try number(in: line, after: "nats per byte (")
        XCTAssertGreaterThan(bytesPerToken, 1)
        XCTAssertEqual(perByte, loss / bytesPerToken, accuracy: 2e-3 * perByte)

        // The checkpoint's tokenizer encodes the prompt and decodes the output.
        result = try CLI.run(["generate", "--checkpoint", "run", "--prompt", "ROMEO.\n", "--tokens", "20", "--temperature", "0"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.hasPrefix("ROMEO.\n"), result.stdout)
        XCTAssertGreaterThan(result.stdout.utf8.count, "ROMEO.\n".utf8.count + 20, "20 BPE tokens are more than 20 bytes here")

        // A tokenizer that cannot be read, or one larger than the model's vocabulary, is refused;
        // a smaller one (a model padded beyond its tokenizer) draws only the tokenizer's ids.
        try FileManager.default.removeItem(atPath: saved)
        result = try CLI.run(["generate", "--checkpoint", "run/checkpoints/step_00000006", "--tokenizer", "nope.json"], in: workspace.url)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("tokenizer 'nope.json': cannot read it"), result.stderr)
        let big = try BytePairEncoding.learn(from: [Array(Workspace.text(lines: 300, seed: 9).map { UInt8($0) })], vocabularySize: 310)
        let small = try BytePairEncoding.learn(from: [Array(Workspace.text(lines: 300, seed: 9).map { UInt8($0) })], vocabularySize: 270)
        try small.json().write(toFile: workspace.path("small.json"), atomically: true, encoding: .utf8)
        result = try CLI.run(["generate", "--checkpoint", "run/checkpoints/step_00000006", "--tokenizer", "small.json", "--tokens", "40"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        try big.json().write(toFile: workspace.path("big.json"), atomically: true, encoding: .utf8)
        result = try CLI.run(["generate", "--checkpoint", "run/checkpoints/step_00000006", "--tokenizer", "big.json"], in: workspace.url)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("tokenizer 'big.json' has 310 tokens but the model's vocabulary has 300"), result.stderr)
    }

    /// Hugging Face `tokenizers` (the reference implementation of byte-level BPE) reads our
    /// tokenizer.json and encodes each prepared file to the very ids `moe prepare` wrote.
    func testHuggingFaceTokenizersEncodeTheSameIds() throws {
        try CLI.requirePython("tokenizers, numpy", "the Python tokenizers package is not installed (launch/test.sh installs it with transformers)")
        let workspace = try Workspace()
        try corpus(workspace)
        // Text with non-ASCII letters, digits, contractions and runs of white space.
        try workspace.write("corpus/unicode.txt", String(repeating: "Ærø café's 東京 ½ №5 ...,  ok\u{a0} \u{3000}end\r\n\tthey'll 123 ", count: 30))
        let result = try CLI.run(["prepare", "--input", "corpus", "--val-input", "corpus/unicode.txt", "--output", "bpe",
                                  "--tokenizer", "bpe", "--vocab-size", "400"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let checked = try CLI.python(["-c", """
            import sys, glob, numpy as np
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
            for split, files in (("train", sorted(glob.glob(sys.argv[2] + "/work*.txt"))), ("val", [sys.argv[2] + "/unicode.txt"])):
                ours = np.fromfile(f"{sys.argv[1]}/{split}.bin", dtype=np.uint16)[512:].tolist()
                theirs = [i for f in files for i in tok.encode(open(f, encoding="utf-8", newline="").read(), add_special_tokens=False).ids]
                assert ours == theirs, (split, len(ours), len(theirs), next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b))
                print(split, len(ours))
            """, workspace.path("bpe"), workspace.path("corpus")])
        XCTAssertEqual(checked.status, 0, checked.stderr)
        XCTAssertTrue(checked.stdout.contains("val "), checked.stdout)
    }

    /// GPT-2-style data whose tokenizer is llm.c's `gpt2_tokenizer.bin` (here a 260-token one in
    /// that format): generate decodes with `--tokenizer`, and `data.tokenizer` puts the file into
    /// the checkpoints, where generate finds it without the option.
    func testLlmcTokenizerFileDecodesGeneration() throws {
        let workspace = try Workspace()
        var header = [UInt32](repeating: 0, count: 256)
        header[0] = LlmcTokenizer.magic; header[1] = 2; header[2] = 260; header[3] = 259
        let tokens: [[UInt8]] = (0..<256).map { [UInt8($0)] } + [Array(" the".utf8), Array(" love".utf8), Array(" night".utf8), Array("<|endoftext|>".utf8)]
        var data = header.withUnsafeBytes { Data($0) }
        for token in tokens { data.append(UInt8(token.count)); data.append(contentsOf: token) }
        try data.write(to: URL(fileURLWithPath: workspace.path("gpt2_tokenizer.bin")))
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        var result = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "run", "--set", "model.vocab_size=260",
                                  "--set", "data.tokenizer=gpt2_tokenizer.bin"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000012/tokenizer.bin")))
        for extra in [["--tokenizer", "gpt2_tokenizer.bin"], []] {
            result = try CLI.run(["generate", "--checkpoint", "run", "--prompt", "ROMEO. the love", "--tokens", "30", "--seed", "3"] + extra,
                                 in: workspace.url)
            XCTAssertEqual(result.status, 0, result.stderr)
            XCTAssertTrue(result.stdout.hasPrefix("ROMEO. the love"), result.stdout)
        }
    }

    /// A byte-level run has no tokenizer and needs none; a vocabulary above 256 without one is a
    /// clear error naming the checkpoint.
    func testCheckpointWithoutTokenizer() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        var result = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "run", "--set", "model.vocab_size=300"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000012/tokenizer.json")))
        result = try CLI.run(["generate", "--checkpoint", "run", "--tokens", "5"], in: workspace.url)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("has a vocabulary of 300 tokens and no tokenizer; pass --tokenizer FILE"), result.stderr)
        result = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "run2", "--set", "data.tokenizer=missing.json"], in: workspace.url)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("tokenizer 'missing.json': cannot read it (data.tokenizer)"), result.stderr)
    }
}
