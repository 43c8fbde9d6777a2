import Foundation

/// A byte-level BPE tokenizer (GPT-2's scheme): text is split into pieces by `PreTokenizer`,
/// each piece starts as its bytes and pairs are merged in the order they were learned. Any
/// byte sequence encodes, and decoding concatenates the tokens' bytes, so the round trip is
/// exact for every input. Stored as Hugging Face `tokenizer.json` (BPE model, ByteLevel
/// pre-tokenizer and decoder), which `tokenizers` and `transformers` load as they are.
public final class BytePairEncoding: Tokenizer, @unchecked Sendable {
    /// Each token's bytes, by id.
    public let tokenBytes: [[UInt8]]
    /// The merges in rank order, as (left id, right id, merged id).
    public let merges: [(left: Int32, right: Int32, merged: Int32)]
    /// The id of each single byte.
    let byteIds: [Int32]
    /// (left << 32 | right) -> (rank, merged id).
    let mergeTable: [UInt64: (rank: Int32, merged: Int32)]
    /// Tokens of pieces seen before (a corpus repeats its words).
    private var cache: [[UInt8]: [Int32]] = [:]
    private let cacheLock = NSLock()

    public var vocabularySize: Int { tokenBytes.count }

    public init(tokenBytes: [[UInt8]], merges: [(left: Int32, right: Int32, merged: Int32)]) throws {
        self.tokenBytes = tokenBytes
        self.merges = merges
        var byteIds = [Int32](repeating: -1, count: 256)
        for (id, bytes) in tokenBytes.enumerated() where bytes.count == 1 && byteIds[Int(bytes[0])] < 0 { byteIds[Int(bytes[0])] = Int32(id) }
        if let missing = byteIds.firstIndex(of: -1) {
            throw TokenizerError.malformed(path: "", reason: "byte \(missing) has no token: a byte-level BPE needs all 256 bytes in its vocabulary")
        }
        self.byteIds = byteIds
        var table: [UInt64: (rank: Int32, merged: Int32)] = [:]
        for (rank, merge) in merges.enumerated() where table[Self.key(merge.left, merge.right)] == nil {
            table[Self.key(merge.left, merge.right)] = (Int32(rank), merge.merged)
        }
        mergeTable = table
    }

    @inline(__always) static func key(_ left: Int32, _ right: Int32) -> UInt64 { UInt64(UInt32(left)) << 32 | UInt64(UInt32(right)) }

    public func encode(_ bytes: [UInt8]) -> [Int32] {
        var tokens: [Int32] = []
        tokens.reserveCapacity(bytes.count / 3)
        bytes.withUnsafeBufferPointer { buffer in
            PreTokenizer.forEachPiece(in: buffer) { range in
                let piece = Array(buffer[range])
                cacheLock.lock()
                let known = cache[piece]
                cacheLock.unlock()
                if let known { tokens += known; return }
                let encoded = encodePiece(piece)
                cacheLock.lock()
                if cache.count < 1 << 20 { cache[piece] = encoded }
                cacheLock.unlock()
                tokens += encoded
            }
        }
        return tokens
    }

    /// Applies the merges to one piece: repeatedly the lowest-ranked adjacent pair, every
    /// occurrence left to right.
    func encodePiece(_ piece: [UInt8]) -> [Int32] {
        var parts = piece.map { byteIds[Int($0)] }
        while parts.count > 1 {
            var best: (rank: Int32, merged: Int32)?
            for index in 0..<(parts.count - 1) {
                if let merge = mergeTable[Self.key(parts[index], parts[index + 1])], merge.rank < (best?.rank ?? .max) { best = merge }
            }
            guard let best else { break }
            let merge = merges[Int(best.rank)]
            parts = Self.mergeAll(parts, merge.left, merge.right, into: merge.merged)
        }
        return parts
    }

    /// `parts` with every adjacent (left, right), taken left to right, replaced by `merged`.
    static func mergeAll(_ parts: [Int32], _ left: Int32, _ right: Int32, into merged: Int32) -> [Int32] {
        var result: [Int32] = []
        result.reserveCapacity(parts.count)
        var index = 0
        while index < parts.count {
            if index + 1 < parts.count && parts[index] == left && parts[index + 1] == right {
                result.append(merged)
                index += 2
            } else {
                result.append(parts[index])
                index += 1
            }
        }
        return result
    }

    /// An id outside the vocabulary (a model with more ids than its tokenizer) decodes to nothing.
    public func decode(_ token: Int32) -> [UInt8] { tokenBytes.indices.contains(Int(token)) ? tokenBytes[Int(token)] : [] }
}

// MARK: learning the merges

extension BytePairEncoding {
    /// The distinct pieces of `texts` (sorted, so that learning does not depend on hash order)
    /// and how often each occurs.
    static func distinctPieces(of texts: [[UInt8]]) -> (pieces: [[UInt8]], counts: [Int]) {
        var pieceCounts: [[UInt8]: Int] = [:]
        for text in texts {
            text.withUnsafeBufferPointer { buffer in
                PreTokenizer.forEachPiece(in: buffer) { pieceCounts[Array(buffer[$0]), default: 0] += 1 }
            }
        }
        let sorted = pieceCounts.sorted { $0.key.lexicographicallyPrecedes($1.key) }
        return (sorted.map(\.key), sorted.map(\.value))
    }

    /// Learns merges until the vocabulary has `vocabularySize` tokens (or no pair occurs twice)
    /// from the pieces of `texts`. Ids 0-255 are the bytes; merge r makes id 256 + r. Ties
    /// between equally frequent pairs go to the smaller (left, right) ids, so the result is a
    /// function of the input alone.
    public static func learn(from texts: [[UInt8]], vocabularySize: Int) throws -> BytePairEncoding {
        precondition(vocabularySize >= 256, "a byte-level vocabulary has at least 256 tokens")
        let (pieces, counts) = distinctPieces(of: texts)
        var words = pieces.map { $0.map(Int32.init) }
        var pairCounts: [UInt64: Int] = [:]
        var wordsWithPair: [UInt64: [Int32]] = [:]
        for (index, word) in words.enumerated() where word.count > 1 {
            for position in 0..<(word.count - 1) {
                let pair = key(word[position], word[position + 1])
                pairCounts[pair, default: 0] += counts[index]
                wordsWithPair[pair, default: []].append(Int32(index))
            }
        }
        var tokenBytes = (0..<256).map { [UInt8($0)] }
        var merges: [(left: Int32, right: Int32, merged: Int32)] = []
        var lastVisit = [Int](repeating: -1, count: words.count)
        while tokenBytes.count < vocabularySize {
            var best: (pair: UInt64, count: Int)?
            for (pair, count) in pairCounts where count > (best?.count ?? 1) || (count == best?.count && pair < best!.pair) {
                best = (pair, count)
            }
            guard let best else { break }
            let left = Int32(truncatingIfNeeded: best.pair >> 32), right = Int32(truncatingIfNeeded: best.pair & 0xFFFF_FFFF)
            let merged = Int32(tokenBytes.count)
            tokenBytes.append(tokenBytes[Int(left)] + tokenBytes[Int(right)])
            merges.append((left, right, merged))
            // Re-count the pairs of every word that holds the merged pair.
            for wordIndex in wordsWithPair[best.pair] ?? [] where lastVisit[Int(wordIndex)] != merges.count {
                lastVisit[Int(wordIndex)] = merges.count
                let index = Int(wordIndex), old = words[index]
                let new = mergeAll(old, left, right, into: merged)
                guard new.count != old.count else { continue }
                for position in 0..<(old.count - 1) {
                    let pair = key(old[position], old[position + 1])
                    pairCounts[pair]! -= counts[index]
                    if pairCounts[pair]! == 0 { pairCounts[pair] = nil }
                }
                for position in 0..<max(0, new.count - 1) {
                    let pair = key(new[position], new[position + 1])
                    pairCounts[pair, default: 0] += counts[index]
                    if new[position] == merged || new[position + 1] == merged { wordsWithPair[pair, default: []].append(wordIndex) }
                }
                words[index] = new
            }
            wordsWithPair[best.pair] = nil
        }
        return try BytePairEncoding(tokenBytes: tokenBytes, merges: merges)
    }
}

// MARK: tokenizer.json (Hugging Face `tokenizers` format)

extension BytePairEncoding {
    /// GPT-2's printable stand-in for each byte (so every vocabulary entry is a visible string).
    static let byteToScalar: [Unicode.Scalar] = {
        let printable = Array(33...126) + Array(161...172) + Array(174...255)
        var scalars = [Unicode.Scalar](repeating: " ", count: 256)
        for byte in printable { scalars[byte] = Unicode.Scalar(UInt8(byte)) }
        var next: UInt32 = 256
        for byte in 0..<256 where !printable.contains(byte) {
            scalars[byte] = Unicode.Scalar(next)!
            next += 1
        }
        return scalars
    }()
    static let scalarToByte: [Unicode.Scalar: UInt8] = Dictionary(uniqueKeysWithValues: byteToScalar.enumerated().map { ($1, UInt8($0)) })

    static func visible(_ bytes: [UInt8]) -> String {
        var text = ""
        text.unicodeScalars.append(contentsOf: bytes.map { byteToScalar[Int($0)] })
        return text
    }

    public func json() -> String {
        func quoted(_ text: String) -> String {
            var result = "\""
            for scalar in text.unicodeScalars {
                switch scalar {
                case "\"": result += "\\\""
                case "\\": result += "\\\\"
                default: result.unicodeScalars.append(scalar)
                }
            }
            return result + "\""
        }
        let vocabulary = tokenBytes.enumerated().map { "\(quoted(Self.visible($1))): \($0)" }.joined(separator: ",\n      ")
        let mergeLines = merges.map { quoted(Self.visible(tokenBytes[Int($0.left)]) + " " + Self.visible(tokenBytes[Int($0.right)])) }
            .joined(separator: ",\n      ")
        let byteLevel = #"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}"#
        return """
            {
              "version": "1.0",
              "truncation": null,
              "padding": null,
              "added_tokens": [],
              "normalizer": null,
              "pre_tokenizer": \(byteLevel),
              "post_processor": null,
              "decoder": \(byteLevel),
              "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": {
                  \(vocabulary)
                },
                "merges": [
                  \(mergeLines)
                ]
              }
            }

            """
    }

    /// Reads a byte-level BPE `tokenizer.json` (ours or another one in that format, such as
    /// GPT-2's from the Hugging Face hub).
    public static func read(json data: Data, path: String) throws -> BytePairEncoding {
        func malformed(_ reason: String) -> TokenizerError { .malformed(path: path, reason: reason) }
        guard let root = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else { throw malformed("not a JSON object") }
        guard let model = root["model"] as? [String: Any], model["type"] as? String == "BPE" else { throw malformed("model.type is not BPE") }
        guard let pre = root["pre_tokenizer"] as? [String: Any], pre["type"] as? String == "ByteLevel" else {
            throw malformed("only the ByteLevel pre-tokenizer is supported")
        }
        guard let vocabulary = model["vocab"] as? [String: Int], let rawMerges = model["merges"] as? [Any] else {
            throw malformed("model.vocab or model.merges is missing")
        }
        // Ids come from the file: bounded before the table of that size is allocated.
        if let id = vocabulary.values.first(where: { !(0..<maximumTokenizerVocabulary).contains($0) }) {
            throw malformed("id \(id) is outside 0..<\(maximumTokenizerVocabulary)")
        }
        var tokenBytes = [[UInt8]?](repeating: nil, count: (vocabulary.values.max() ?? -1) + 1)
        for (text, id) in vocabulary {
            tokenBytes[id] = try text.unicodeScalars.map { scalar in
                guard let byte = scalarToByte[scalar] else { throw malformed("vocabulary entry '\(text)' is not byte-level") }
                return byte
            }
        }
        for added in root["added_tokens"] as? [[String: Any]] ?? [] {
            if let id = added["id"] as? Int, let content = added["content"] as? String, (0..<tokenBytes.count).contains(id), tokenBytes[id] == nil {
                tokenBytes[id] = Array(content.utf8)
            }
        }
        if let hole = tokenBytes.firstIndex(where: { $0 == nil }) { throw malformed("no token has id \(hole)") }
        var merges: [(left: Int32, right: Int32, merged: Int32)] = []
        for raw in rawMerges {
            let halves: [String]
            if let line = raw as? String { halves = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init) }
            else if let pair = raw as? [String] { halves = pair } else { throw malformed("a merge is neither \"a b\" nor [a, b]") }
            guard halves.count == 2, let left = vocabulary[halves[0]], let right = vocabulary[halves[1]],
                  let merged = vocabulary[halves[0] + halves[1]] else {
                throw malformed("merge '\(halves.joined(separator: " "))' names tokens outside the vocabulary")
            }
            merges.append((Int32(left), Int32(right), Int32(merged)))
        }
        do {
            return try BytePairEncoding(tokenBytes: tokenBytes.map { $0! }, merges: merges)
        } catch TokenizerError.malformed(_, let reason) {
            throw malformed(reason)
        }
    }
}
