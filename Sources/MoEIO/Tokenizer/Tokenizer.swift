import Foundation

/// Text in, token ids out, and back. `decode` returns a token's bytes: a token may hold part of
/// a UTF-8 character, so callers join bytes before making text.
public protocol Tokenizer: Sendable {
    var vocabularySize: Int { get }
    func encode(_ bytes: [UInt8]) -> [Int32]
    func decode(_ token: Int32) -> [UInt8]
}

public extension Tokenizer {
    func encode(_ text: String) -> [Int32] { encode(Array(text.utf8)) }
    func decode(_ tokens: [Int32]) -> [UInt8] { tokens.flatMap { decode($0) } }
}

/// One token per byte: the default, and what every byte-level (vocabulary 256) model uses.
public struct ByteTokenizer: Tokenizer {
    public init() {}
    public var vocabularySize: Int { 256 }
    public func encode(_ bytes: [UInt8]) -> [Int32] { bytes.map(Int32.init) }
    public func decode(_ token: Int32) -> [UInt8] { [UInt8(truncatingIfNeeded: token)] }
}

/// The most tokens a tokenizer may have: token files hold uint16 ids. Loaders check sizes and
/// ids read from a file against it before allocating anything of that size.
public let maximumTokenizerVocabulary = 65536

public enum TokenizerError: Error, CustomStringConvertible {
    case unreadable(path: String)
    case malformed(path: String, reason: String)
    case vocabularyMismatch(path: String, tokenizer: Int, model: Int)

    public var description: String {
        switch self {
        case let .unreadable(path): return "tokenizer '\(path)': cannot read it (missing or not a file)"
        case let .malformed(path, reason): return "tokenizer '\(path)': \(reason)"
        case let .vocabularyMismatch(path, tokenizer, model):
            return "tokenizer '\(path)' has \(tokenizer) tokens but the model's vocabulary has \(model)"
        }
    }
}

/// A tokenizer as the file it came from (checkpoints keep the file itself).
public struct TokenizerFile: Sendable {
    public let path: String
    public let contents: Data
    public let tokenizer: Tokenizer

    public init(path: String, contents: Data, tokenizer: Tokenizer) {
        self.path = path
        self.contents = contents
        self.tokenizer = tokenizer
    }
    /// The file's name inside a checkpoint: `tokenizer.json`, or `tokenizer.bin` for llm.c's format.
    public var checkpointName: String { tokenizer is BytePairEncoding ? Tokenizers.fileName : Tokenizers.llmcFileName }
    /// The file a checkpoint carries: its name there and its contents.
    public var checkpointAttachment: [String: Data] { [checkpointName: contents] }
}

public enum Tokenizers {
    /// The name a tokenizer has beside `train.bin` and inside a checkpoint.
    public static let fileName = "tokenizer.json"
    public static let llmcFileName = "tokenizer.bin"

    /// The run's tokenizer: `data.tokenizer` if set (it must exist), else `tokenizer.json`
    /// beside the first training file, else none.
    public static func forRun(configured: String, firstTrainingFile: String?) throws -> TokenizerFile? {
        let path: String
        if !configured.isEmpty {
            path = configured
        } else if let first = firstTrainingFile {
            path = ((first as NSString).deletingLastPathComponent as NSString).appendingPathComponent(fileName)
            guard FileManager.default.fileExists(atPath: path) else { return nil }
        } else {
            return nil
        }
        guard let contents = FileManager.default.contents(atPath: path) else {
            throw TokenizerError.malformed(path: path, reason: "cannot read it (data.tokenizer)")
        }
        return TokenizerFile(path: path, contents: contents, tokenizer: try load(contents, path: path))
    }

    /// Reads `tokenizer.json` (byte-level BPE) or llm.c's `gpt2_tokenizer.bin`, told apart by content.
    public static func load(_ path: String) throws -> Tokenizer {
        guard RegularFile.problem(path) == nil, let data = FileManager.default.contents(atPath: path) else {
            throw TokenizerError.unreadable(path: path)
        }
        return try load(data, path: path)
    }

    public static func load(_ data: Data, path: String) throws -> Tokenizer {
        if data.first == UInt8(ascii: "{") { return try BytePairEncoding.read(json: data, path: path) }
        return try LlmcTokenizer(data: data, path: path)
    }
}

/// llm.c's tokenizer file (`gpt2_tokenizer.bin`): a 256-int32 header (magic 20240328,
/// version 1 or 2, vocabulary size, end-of-text id in version 2), then each token as a length
/// byte and its bytes. It holds no merges, so it decodes exactly; text is encoded by longest
/// match, a valid tokenization though not always the one GPT-2's BPE would pick.
public struct LlmcTokenizer: Tokenizer {
    public static let magic: UInt32 = 20240328
    public let tokenBytes: [[UInt8]]
    public let endOfText: Int32?
    let longest: Int
    let ids: [[UInt8]: Int32]

    public var vocabularySize: Int { tokenBytes.count }

    public init(data: Data, path: String) throws {
        let bytes = [UInt8](data)
        func word(_ index: Int) -> UInt32 {
            (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[index * 4 + $1]) << (8 * $1) }
        }
        guard bytes.count >= 1024, word(0) == Self.magic else {
            throw TokenizerError.malformed(path: path, reason: "neither a tokenizer.json nor an llm.c tokenizer file (magic \(Self.magic))")
        }
        guard [1, 2].contains(word(1)) else { throw TokenizerError.malformed(path: path, reason: "unsupported llm.c tokenizer version \(word(1))") }
        let count = Int(word(2))
        guard (1...maximumTokenizerVocabulary).contains(count) else {
            throw TokenizerError.malformed(path: path, reason: "vocabulary size \(count) is outside 1...\(maximumTokenizerVocabulary)")
        }
        guard word(1) == 1 || Int(word(3)) < count else {
            throw TokenizerError.malformed(path: path, reason: "end-of-text id \(word(3)) is outside the \(count) tokens")
        }
        endOfText = word(1) == 2 ? Int32(word(3)) : nil
        var tokens: [[UInt8]] = [], offset = 1024
        tokens.reserveCapacity(count)
        for id in 0..<count {
            guard offset < bytes.count, offset + 1 + Int(bytes[offset]) <= bytes.count else {
                throw TokenizerError.malformed(path: path, reason: "truncated at token \(id) of \(count)")
            }
            let length = Int(bytes[offset])
            tokens.append(Array(bytes[(offset + 1)..<(offset + 1 + length)]))
            offset += 1 + length
        }
        tokenBytes = tokens
        longest = max(1, tokens.map(\.count).max() ?? 1)
        var ids: [[UInt8]: Int32] = [:]
        for (id, token) in tokens.enumerated() where !token.isEmpty && ids[token] == nil && Int32(id) != endOfText { ids[token] = Int32(id) }
        self.ids = ids
    }

    public func encode(_ bytes: [UInt8]) -> [Int32] {
        var tokens: [Int32] = [], start = 0
        while start < bytes.count {
            // At least one byte a round, so the loop advances whatever the vocabulary holds.
            var length = max(1, min(longest, bytes.count - start))
            while length > 1 && ids[Array(bytes[start..<(start + length)])] == nil { length -= 1 }
            // A byte without a token of its own cannot be encoded; GPT-2's vocabulary has all 256.
            tokens.append(ids[Array(bytes[start..<(start + length)])] ?? endOfText ?? 0)
            start += length
        }
        return tokens
    }

    /// An id outside the vocabulary (a model with more ids than its tokenizer) decodes to nothing.
    public func decode(_ token: Int32) -> [UInt8] { tokenBytes.indices.contains(Int(token)) ? tokenBytes[Int(token)] : [] }
}
