import Foundation
import XCTest
import MoEIO

/// Tokenizer files are input: their sizes and ids are checked before anything of that size is
/// allocated, and a degenerate vocabulary cannot stall encoding.
final class HostileTokenizerTests: XCTestCase {
    func llmcFile(version: UInt32, count: UInt32, endOfText: UInt32 = 0, tokens: [[UInt8]]) -> Data {
        var header = [UInt32](repeating: 0, count: 256)
        (header[0], header[1], header[2], header[3]) = (LlmcTokenizer.magic, version, count, endOfText)
        var data = header.withUnsafeBytes { Data($0) }
        for token in tokens { data.append(UInt8(token.count)); data.append(contentsOf: token) }
        return data
    }

    func testSizesAndIdsFromTheFileAreBounded() {
        let cases: [(Data, String)] = [
            (llmcFile(version: 1, count: UInt32.max, tokens: []), "vocabulary size 4294967295 is outside"),   // used to reserve 2^32 tokens
            (llmcFile(version: 2, count: 2, endOfText: 1 << 31 + 5, tokens: [[65], [66]]), "end-of-text id"),  // used to trap in Int32(...)
            (Data(#"{"model":{"type":"BPE","vocab":{"a":4611686018427387904},"merges":[]},"pre_tokenizer":{"type":"ByteLevel"}}"#.utf8),
             "id 4611686018427387904 is outside"),                                                          // used to trap on max + 1
        ]
        for (data, expected) in cases {
            XCTAssertThrowsError(try Tokenizers.load(data, path: "t")) { XCTAssertTrue("\($0)".contains(expected), "\($0)") }
        }
    }

    /// A vocabulary of empty tokens used to make encoding loop forever without advancing.
    func testEmptyTokensStillEncodeAndOutOfRangeIdsDecodeToNothing() throws {
        let tokenizer = try Tokenizers.load(llmcFile(version: 1, count: 3, tokens: [[], [], []]), path: "t")
        XCTAssertEqual(tokenizer.encode(Array("abc".utf8)).count, 3)
        XCTAssertEqual(tokenizer.decode(Int32(7)), [])
    }
}
