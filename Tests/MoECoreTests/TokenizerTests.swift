import Foundation
import XCTest
import MoEIO

/// The byte-level BPE: GPT-2's pre-tokenization, exact round trips, deterministic learning,
/// the tokenizer.json round trip, and llm.c's tokenizer file.
final class TokenizerTests: XCTestCase {
    /// Pieces printed by Hugging Face `tokenizers` (`pre_tokenizers.ByteLevel(add_prefix_space=False)
    /// .pre_tokenize_str`, version 0.23), the reference implementation of GPT-2's split.
    func testPiecesMatchTheReferenceSplit() {
        let expected: [(String, [String])] = [
            ("Hello world's  123!!\n\n  x", ["Hello", " world", "'s", " ", " 123", "!!", "\n\n ", " x"]),
            ("It'll be  done\tnow; 'tis ", ["It", "'ll", " be", " ", " done", "\t", "now", ";", " '", "tis", " "]),
            ("Ærø café 東京 ½ №5 ..., ok\u{a0} \u{3000}end", ["Ærø", " café", " 東京", " ½", " №", "5", " ...,", " ok", "\u{a0} ", "\u{3000}", "end"]),
            ("  \n\n", ["  \n\n"]),
            ("a\r\n b", ["a", "\r\n", " b"]),
        ]
        for (text, pieces) in expected {
            XCTAssertEqual(PreTokenizer.pieces(of: Array(text.utf8)).map { String(decoding: $0, as: UTF8.self) }, pieces, text)
        }
    }

    static let corpus = Array(String(repeating: "the quick brown fox jumps over the lazy dog; the dog sleeps.\nThe fox's den, 12 foxes! ", count: 40).utf8)

    func testAnyBytesRoundTripExactly() throws {
        let tokenizer = try BytePairEncoding.learn(from: [Self.corpus], vocabularySize: 300)
        XCTAssertEqual(tokenizer.vocabularySize, 300)
        var generator = SystemRandomNumberGenerator()
        var inputs: [[UInt8]] = [Array("Ærø café 東京 ½ №5 the fox\u{1F98A} 'll\r\n\t ".utf8), [], [0xFF], [0xC3], [0xE6, 0x9D, 0x41], Self.corpus]
        inputs += (0..<50).map { _ in (0..<Int.random(in: 1...200, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) } }
        for bytes in inputs {
            let tokens = tokenizer.encode(bytes)
            XCTAssertEqual(tokenizer.decode(tokens), bytes)
            XCTAssertTrue(tokens.allSatisfy { (0..<300).contains($0) })
        }
        XCTAssertLessThan(tokenizer.encode(Self.corpus).count, Self.corpus.count / 3, "the merges compress the text they were learned on")
    }

    /// Learning is a function of the text: twice gives the same merges; the first merge is the
    /// most frequent byte pair within pieces (ties: smallest bytes), counted here by brute force;
    /// every merged token is its two halves.
    func testLearningIsDeterministicAndGreedy() throws {
        let first = try BytePairEncoding.learn(from: [Self.corpus], vocabularySize: 280)
        let second = try BytePairEncoding.learn(from: [Self.corpus], vocabularySize: 280)
        XCTAssertEqual(first.json(), second.json())
        // Count adjacent byte pairs within pieces by brute force: the first merge is the top one.
        var counts: [[UInt8]: Int] = [:]
        for piece in PreTokenizer.pieces(of: Self.corpus) where piece.count > 1 {
            for index in 0..<(piece.count - 1) { counts[[piece[index], piece[index + 1]], default: 0] += 1 }
        }
        let top = counts.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key.lexicographicallyPrecedes($1.key) }[0]
        XCTAssertEqual(first.tokenBytes[256], top.key)
        XCTAssertEqual(first.tokenBytes.count, 280)
        for (index, merge) in first.merges.enumerated() {
            XCTAssertEqual(first.tokenBytes[Int(merge.merged)], first.tokenBytes[Int(merge.left)] + first.tokenBytes[Int(merge.right)])
            XCTAssertEqual(Int(merge.merged), 256 + index)
        }
    }

    func testTokenizerJSONRoundTrip() throws {
        let tokenizer = try BytePairEncoding.learn(from: [Self.corpus], vocabularySize: 320)
        let read = try BytePairEncoding.read(json: Data(tokenizer.json().utf8), path: "t.json")
        XCTAssertEqual(read.tokenBytes, tokenizer.tokenBytes)
        XCTAssertEqual(read.encode(Self.corpus), tokenizer.encode(Self.corpus))
        XCTAssertThrowsError(try BytePairEncoding.read(json: Data("{\"model\": {\"type\": \"WordPiece\"}}".utf8), path: "bad.json")) {
            XCTAssertEqual("\($0)", "tokenizer 'bad.json': model.type is not BPE")
        }
    }

    /// llm.c's gpt2_tokenizer.bin layout, version 2, with a 260-token vocabulary.
    func testLlmcTokenizerFileDecodes() throws {
        var header = [UInt32](repeating: 0, count: 256)
        header[0] = LlmcTokenizer.magic; header[1] = 2; header[2] = 260; header[3] = 259
        let tokens: [[UInt8]] = (0..<256).map { [UInt8($0)] } + [Array(" the".utf8), Array("fox".utf8), Array(" fox".utf8), Array("<|endoftext|>".utf8)]
        var data = header.withUnsafeBytes { Data($0) }
        for token in tokens { data.append(UInt8(token.count)); data.append(contentsOf: token) }
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("llmc-\(UUID().uuidString).bin")
        try data.write(to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        let tokenizer = try Tokenizers.load(url.path)
        XCTAssertEqual(tokenizer.vocabularySize, 260)
        XCTAssertEqual(String(decoding: tokenizer.decode([256, 258, 259]), as: UTF8.self), " the fox<|endoftext|>")
        XCTAssertEqual(tokenizer.encode(" the fox!"), [256, 258, 33])
        try Data(count: 2000).write(to: url)
        XCTAssertThrowsError(try Tokenizers.load(url.path)) {
            XCTAssertTrue("\($0)".hasPrefix("tokenizer '\(url.path)': neither a tokenizer.json nor an llm.c tokenizer file"), "\($0)")
        }
    }
}
