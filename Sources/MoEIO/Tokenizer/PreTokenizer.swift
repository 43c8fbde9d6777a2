/// Splits bytes into the pieces a byte-level BPE merges within, by GPT-2's rule (the regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, the default of
/// Hugging Face's `ByteLevel` pre-tokenizer), written out as a scanner so that it also takes
/// bytes that are not UTF-8: each invalid byte counts as punctuation. Pieces cover the input
/// exactly, in order, so decoding is concatenation (docs/ARCHITECTURE.md, "Tokenizer").
public enum PreTokenizer {
    enum CharacterClass { case letter, number, space, other }

    /// Calls `body` with each piece's byte range, in order.
    public static func forEachPiece(in bytes: UnsafeBufferPointer<UInt8>, _ body: (Range<Int>) -> Void) {
        let count = bytes.count
        var start = 0
        while start < count {
            let end = pieceEnd(bytes, from: start)
            body(start..<end)
            start = end
        }
    }

    public static func pieces(of bytes: [UInt8]) -> [[UInt8]] {
        var result: [[UInt8]] = []
        bytes.withUnsafeBufferPointer { buffer in forEachPiece(in: buffer) { result.append(Array(buffer[$0])) } }
        return result
    }

    /// End (exclusive) of the piece that starts at `start`.
    static func pieceEnd(_ bytes: UnsafeBufferPointer<UInt8>, from start: Int) -> Int {
        let count = bytes.count
        if bytes[start] == UInt8(ascii: "'"), let length = contractionLength(bytes, at: start) { return start + length }
        let first = character(bytes, at: start)
        // ` ?X+` for the three non-space classes: an optional single space, then a run.
        if bytes[start] == UInt8(ascii: " ") && start + 1 < count {
            let next = character(bytes, at: start + 1)
            if next.kind != .space { return runEnd(bytes, from: start + 1 + next.length, kind: next.kind) }
        }
        if first.kind != .space { return runEnd(bytes, from: start + first.length, kind: first.kind) }
        // `\s+(?!\S)|\s+`: a whitespace run leaves its last character to the next word when a
        // word follows and the run is longer than one character.
        var end = start + first.length, lastStart = start
        while end < count {
            let next = character(bytes, at: end)
            guard next.kind == .space else { return lastStart > start ? lastStart : end }
            lastStart = end
            end += next.length
        }
        return end
    }

    static func runEnd(_ bytes: UnsafeBufferPointer<UInt8>, from start: Int, kind: CharacterClass) -> Int {
        var end = start
        while end < bytes.count {
            let next = character(bytes, at: end)
            guard next.kind == kind else { break }
            end += next.length
        }
        return end
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d` (case-sensitive, as in GPT-2).
    static func contractionLength(_ bytes: UnsafeBufferPointer<UInt8>, at start: Int) -> Int? {
        guard start + 1 < bytes.count else { return nil }
        switch bytes[start + 1] {
        case UInt8(ascii: "s"), UInt8(ascii: "t"), UInt8(ascii: "m"), UInt8(ascii: "d"): return 2
        case UInt8(ascii: "r"), UInt8(ascii: "v"):
            return start + 2 < bytes.count && bytes[start + 2] == UInt8(ascii: "e") ? 3 : nil
        case UInt8(ascii: "l"):
            return start + 2 < bytes.count && bytes[start + 2] == UInt8(ascii: "l") ? 3 : nil
        default: return nil
        }
    }

    /// The class and UTF-8 length of the character at `index` (an invalid byte: `.other`, 1).
    @inline(__always)
    static func character(_ bytes: UnsafeBufferPointer<UInt8>, at index: Int) -> (kind: CharacterClass, length: Int) {
        let lead = bytes[index]
        if lead < 0x80 { return (asciiClasses[Int(lead)], 1) }
        let length: Int, minimum: UInt32
        var value: UInt32
        switch lead {
        case 0xC2...0xDF: length = 2; value = UInt32(lead & 0x1F); minimum = 0x80
        case 0xE0...0xEF: length = 3; value = UInt32(lead & 0x0F); minimum = 0x800
        case 0xF0...0xF4: length = 4; value = UInt32(lead & 0x07); minimum = 0x10000
        default: return (.other, 1)
        }
        guard index + length <= bytes.count else { return (.other, 1) }
        for offset in 1..<length {
            let byte = bytes[index + offset]
            guard byte & 0xC0 == 0x80 else { return (.other, 1) }
            value = value << 6 | UInt32(byte & 0x3F)
        }
        guard value >= minimum, let scalar = Unicode.Scalar(value) else { return (.other, 1) }
        return (classify(scalar), length)
    }

    static func classify(_ scalar: Unicode.Scalar) -> CharacterClass {
        let properties = scalar.properties
        if properties.isWhitespace { return .space }
        switch properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return .letter
        case .decimalNumber, .letterNumber, .otherNumber: return .number
        default: return .other
        }
    }

    static let asciiClasses: [CharacterClass] = (0..<128).map { classify(Unicode.Scalar(UInt8($0))) }
}
