import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Token files in the llm.c format: a header of 256 little-endian int32 (magic 20240520,
/// version 1, token count, ...) followed by `count` uint16 tokens.
///
/// SwiftMoE also stores the vocabulary size in header slot 3 (0 when unknown; llm.c ignores the
/// slot). Without it the vocabulary is inferred: 256 (bytes) if every id is below 256, 50257
/// (GPT-2) if every id is below that, otherwise the largest id + 1.
public final class TokenFile: @unchecked Sendable {
    public static let magic: Int32 = 20240520
    public static let version: Int32 = 1
    public static let headerBytes = 256 * 4

    public let path: String
    /// The tokens: a read-only view of the memory-mapped file (ranks on one node share its page
    /// cache; nothing proportional to the file is on the heap), or of an owned buffer for
    /// tokens made in memory. The view keeps the file alive, so it may outlive the `TokenFile`
    /// expression it came from (`try TokenFile.read(path).tokens.map { ... }`).
    public var tokens: Tokens { Tokens(owner: self, buffer: buffer) }
    let buffer: UnsafeBufferPointer<UInt16>

    /// A random-access view of a file's tokens that holds the file (and its mapping) alive.
    public struct Tokens: RandomAccessCollection, @unchecked Sendable {
        let owner: TokenFile
        let buffer: UnsafeBufferPointer<UInt16>
        public var startIndex: Int { 0 }
        public var endIndex: Int { buffer.count }
        @inline(__always) public subscript(index: Int) -> UInt16 { buffer[index] }
    }
    public let vocabularySize: Int
    /// The mapping to unmap (base, bytes), or the owned buffer to free.
    private let mapping: (base: UnsafeMutableRawPointer, bytes: Int)?
    /// The mapping's slot in `MappedFiles` (its SIGBUS guard), when it has one.
    private var guardSlot: Int?
    private let owned: UnsafeMutableBufferPointer<UInt16>?

    public enum ReadError: Error, CustomStringConvertible {
        case unreadable(path: String)
        case notARegularFile(path: String, what: String)
        case tooShort(path: String, bytes: Int)
        case badMagic(path: String, found: Int32)
        case badVersion(path: String, found: Int32)
        case sizeMismatch(path: String, declared: Int, bytes: Int)
        case badVocabulary(path: String, declared: Int, largestToken: Int)
        case noMatch(key: String, pattern: String)

        public var description: String {
            switch self {
            case let .unreadable(path): return "token file '\(path)': cannot read it (missing or not a file); run `moe prepare` first"
            case let .notARegularFile(path, what): return "token file '\(path)': cannot read it: it is \(what)"
            case let .tooShort(path, bytes):
                return "token file '\(path)': \(bytes) bytes is shorter than the 1024-byte header; the file is truncated or not a token file"
            case let .badMagic(path, found):
                return "token file '\(path)': bad magic number \(found) (expected \(TokenFile.magic)); not an llm.c-format token file"
            case let .badVersion(path, found):
                return "token file '\(path)': unsupported version \(found) (expected \(TokenFile.version): uint16 tokens)"
            case let .sizeMismatch(path, declared, bytes):
                let expected = TokenFile.headerBytes + 2 * declared
                return "token file '\(path)': header declares \(declared) tokens (\(expected) bytes) but the file has \(bytes) bytes; it is truncated or corrupt"
            case let .noMatch(key, pattern):
                return "\(key): '\(pattern)' matches no file"
            case let .badVocabulary(path, declared, largest):
                return "token file '\(path)': token id \(largest) is outside the declared vocabulary of \(declared)"
            }
        }
    }

    /// The shards named by `patterns` (files or globs, in order; a glob's matches sorted), each
    /// read and checked. `key` names the config key in errors (an empty glob is one).
    public static func read(patterns: [String], key: String) throws -> [TokenFile] {
        var paths: [String] = []
        for pattern in patterns {
            guard pattern.contains(where: { "*?[".contains($0) }) else { paths.append(pattern); continue }
            var matches = glob_t()
            defer { globfree(&matches) }
            guard glob(pattern, 0, nil, &matches) == 0, matches.gl_pathc > 0 else { throw ReadError.noMatch(key: key, pattern: pattern) }
            paths += (0..<Int(matches.gl_pathc)).compactMap { matches.gl_pathv[$0].map { String(cString: $0) } }.sorted()
        }
        return try paths.map(read)
    }

    /// Tokens made in memory (tests, the bench's synthetic data).
    public init(path: String, tokens: [UInt16], vocabularySize: Int) {
        let buffer = UnsafeMutableBufferPointer<UInt16>.allocate(capacity: max(tokens.count, 1))
        _ = buffer.initialize(from: tokens)
        self.path = path
        self.buffer = UnsafeBufferPointer(rebasing: buffer[0..<tokens.count])
        self.vocabularySize = vocabularySize
        mapping = nil
        owned = buffer
    }

    private init(path: String, mapping: (base: UnsafeMutableRawPointer, bytes: Int), count: Int, vocabularySize: Int) {
        self.path = path
        self.mapping = mapping
        self.owned = nil
        self.vocabularySize = vocabularySize
        buffer = UnsafeBufferPointer(start: (mapping.base + TokenFile.headerBytes).assumingMemoryBound(to: UInt16.self), count: count)
    }

    deinit {
        if let guardSlot { MappedFiles.unregister(guardSlot) }
        if let mapping { munmap(mapping.base, mapping.bytes) }
        owned?.deallocate()
    }

    /// Maps the file read-only, checks the header, and checks every id in one streaming pass
    /// (pages released as it goes, so the pass does not leave the file in this process's
    /// resident set).
    public static func read(_ path: String) throws -> TokenFile {
        switch RegularFile.problem(path) {
        case nil: break
        case .missing?: throw ReadError.unreadable(path: path)
        case let problem?: throw ReadError.notARegularFile(path: path, what: "\(problem)")
        }
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else { throw ReadError.unreadable(path: path) }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw ReadError.unreadable(path: path) }
        let bytes = Int(status.st_size)
        guard bytes >= headerBytes else { throw ReadError.tooShort(path: path, bytes: bytes) }
        guard let base = mmap(nil, bytes, PROT_READ, MAP_SHARED, descriptor, 0), base != MAP_FAILED else {
            throw ReadError.unreadable(path: path)
        }
        let slot = MappedFiles.register(base: base, bytes: bytes, path: path)
        do {
            let header = (0..<4).map { Int32(littleEndian: base.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) }
            guard header[0] == magic else { throw ReadError.badMagic(path: path, found: header[0]) }
            guard header[1] == version else { throw ReadError.badVersion(path: path, found: header[1]) }
            let count = Int(header[2])
            guard count >= 0, bytes == headerBytes + 2 * count else {
                throw ReadError.sizeMismatch(path: path, declared: count, bytes: bytes)
            }
            let tokens = UnsafeBufferPointer(start: (base + headerBytes).assumingMemoryBound(to: UInt16.self), count: count)
            var largest: UInt16 = 0
            forEachChunk(of: tokens, mapping: (base, bytes)) { chunk in largest = max(largest, chunk.max() ?? 0) }
            let declared = Int(header[3])
            let vocabulary: Int
            if declared > 0 {
                guard Int(largest) < declared else { throw ReadError.badVocabulary(path: path, declared: declared, largestToken: Int(largest)) }
                vocabulary = declared
            } else {
                vocabulary = largest < 256 ? 256 : (largest < 50257 ? 50257 : Int(largest) + 1)
            }
            let file = TokenFile(path: path, mapping: (base, bytes), count: count, vocabularySize: vocabulary)
            file.guardSlot = slot
            return file
        } catch {
            if let slot { MappedFiles.unregister(slot) }
            munmap(base, bytes)
            throw error
        }
    }

    /// Calls `body` on consecutive chunks of the tokens (32 MiB each). A mapped file's pages are
    /// released after each chunk: a pass over a large file does not grow the resident set.
    public func forEachChunk(_ body: (UnsafeBufferPointer<UInt16>) throws -> Void) rethrows {
        try TokenFile.forEachChunk(of: buffer, mapping: mapping, body)
    }

    /// `tokens` lies in `mapping` (when mapped) right after the header.
    private static func forEachChunk(of tokens: UnsafeBufferPointer<UInt16>, mapping: (base: UnsafeMutableRawPointer, bytes: Int)?,
                                     _ body: (UnsafeBufferPointer<UInt16>) throws -> Void) rethrows {
        let chunk = 1 << 24
        for start in stride(from: 0, to: tokens.count, by: chunk) {
            try body(UnsafeBufferPointer(rebasing: tokens[start..<min(start + chunk, tokens.count)]))
            guard let mapping else { continue }
            // Whole pages behind the chunk (the mapping is page-aligned).
            let page = Int(sysconf(Int32(_SC_PAGESIZE)))
            let end = (headerBytes + 2 * min(start + chunk, tokens.count)) / page * page
            if end > 0 { madvise(mapping.base, end, MADV_DONTNEED) }
        }
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
