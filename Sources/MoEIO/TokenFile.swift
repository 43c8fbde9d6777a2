import Foundation

/// Token files in the llm.c format: a header of 256 little-endian int32 (magic 20240520,
/// version 1, token count, ...) followed by `count` uint16 tokens.
///
/// SwiftMoE also stores the vocabulary size in header slot 3 (0 when unknown; llm.c ignores the
/// slot). Without it the vocabulary is inferred: 256 (bytes) if every id is below 256, 50257
/// (GPT-2) if every id is below that, otherwise the largest id + 1.
public struct TokenFile {
    public static let magic: Int32 = 20240520
    public static let version: Int32 = 1
    public static let headerBytes = 256 * 4

    public let path: String
    public let tokens: [UInt16]
    public let vocabularySize: Int

    public enum ReadError: Error, CustomStringConvertible {
        case unreadable(path: String)
        case tooShort(path: String, bytes: Int)
        case badMagic(path: String, found: Int32)
        case badVersion(path: String, found: Int32)
        case sizeMismatch(path: String, declared: Int, bytes: Int)
        case badVocabulary(path: String, declared: Int, largestToken: Int)

        public var description: String {
            switch self {
            case let .unreadable(path): return "token file '\(path)': cannot read it (missing or not a file); run `moe prepare` first"
            case let .tooShort(path, bytes):
                return "token file '\(path)': \(bytes) bytes is shorter than the 1024-byte header; the file is truncated or not a token file"
            case let .badMagic(path, found):
                return "token file '\(path)': bad magic number \(found) (expected \(TokenFile.magic)); not an llm.c-format token file"
            case let .badVersion(path, found):
                return "token file '\(path)': unsupported version \(found) (expected \(TokenFile.version): uint16 tokens)"
            case let .sizeMismatch(path, declared, bytes):
                let expected = TokenFile.headerBytes + 2 * declared
                return "token file '\(path)': header declares \(declared) tokens (\(expected) bytes) but the file has \(bytes) bytes; it is truncated or corrupt"
            case let .badVocabulary(path, declared, largest):
                return "token file '\(path)': token id \(largest) is outside the declared vocabulary of \(declared)"
            }
        }
    }

    public init(path: String, tokens: [UInt16], vocabularySize: Int) {
        self.path = path
        self.tokens = tokens
        self.vocabularySize = vocabularySize
    }

    public static func read(_ path: String) throws -> TokenFile {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue,
              let data = FileManager.default.contents(atPath: path) else { throw ReadError.unreadable(path: path) }
        guard data.count >= headerBytes else { throw ReadError.tooShort(path: path, bytes: data.count) }
        let header: [Int32] = data.withUnsafeBytes { raw in
            (0..<4).map { Int32(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) }
        }
        guard header[0] == magic else { throw ReadError.badMagic(path: path, found: header[0]) }
        guard header[1] == version else { throw ReadError.badVersion(path: path, found: header[1]) }
        let count = Int(header[2])
        guard count >= 0, data.count == headerBytes + 2 * count else {
            throw ReadError.sizeMismatch(path: path, declared: count, bytes: data.count)
        }
        let tokens: [UInt16] = data.withUnsafeBytes { raw in
            (0..<count).map { UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: headerBytes + 2 * $0, as: UInt16.self)) }
        }
        let largest = Int(tokens.max() ?? 0)
        let declared = Int(header[3])
        let vocabulary: Int
        if declared > 0 {
            guard largest < declared else { throw ReadError.badVocabulary(path: path, declared: declared, largestToken: largest) }
            vocabulary = declared
        } else {
            vocabulary = largest < 256 ? 256 : (largest < 50257 ? 50257 : largest + 1)
        }
        return TokenFile(path: path, tokens: tokens, vocabularySize: vocabulary)
    }

    /// Writes atomically (temporary file, then rename).
    public static func write(tokens: [UInt16], vocabularySize: Int, to path: String) throws {
        var data = Data(capacity: headerBytes + 2 * tokens.count)
        var header = [Int32](repeating: 0, count: 256)
        header[0] = magic
        header[1] = version
        header[2] = Int32(tokens.count)
        header[3] = Int32(vocabularySize)
        header.withUnsafeBytes { data.append(contentsOf: $0) }   // little-endian hosts only (x86_64, arm64)
        tokens.withUnsafeBytes { data.append(contentsOf: $0) }
        let temporary = path + ".tmp"
        try data.write(to: URL(fileURLWithPath: temporary))
        _ = try? FileManager.default.removeItem(atPath: path)
        try FileManager.default.moveItem(atPath: temporary, toPath: path)
    }
}
