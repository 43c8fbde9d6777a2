import Foundation

/// Turns text files into token files (bytes, or a byte-level BPE learned on the training split
/// only), split into training and validation by file (a document is never on both sides).
public enum DatasetPreparation {
    public enum TokenizerChoice: Equatable, Sendable {
        case bytes
        /// Learn a byte-level BPE with this many tokens (256 bytes + merges).
        case bpe(vocabularySize: Int)
    }

    public struct Summary: CustomStringConvertible {
        public var trainFiles: [String]
        public var valFiles: [String]
        public var trainTokens: Int
        public var valTokens: Int
        public var trainBytes: Int
        public var valBytes: Int
        /// For BPE: the vocabulary learned, and the seconds spent learning and encoding.
        public var vocabularySize = 256
        public var learnSeconds = 0.0
        public var encodeSeconds = 0.0
        public var description: String {
            var text = "train: \(trainFiles.count) files, \(trainTokens) tokens; val: \(valFiles.count) files, \(valTokens) tokens"
            if vocabularySize != 256 || learnSeconds > 0 {
                let megabytes = Double(trainBytes + valBytes) / 1e6
                text += String(format: "; BPE vocabulary %d learned in %.2f s, %.1f MB encoded in %.2f s (%.1f MB/s), %.3f bytes per token",
                               vocabularySize, learnSeconds, megabytes, encodeSeconds, megabytes / max(encodeSeconds, 1e-9),
                               Double(trainBytes + valBytes) / Double(max(1, trainTokens + valTokens)))
            }
            return text
        }
    }

    public enum PrepareError: Error, CustomStringConvertible {
        case missing(String)
        case notARegularFile(path: String, what: String)
        case empty(String)
        case cannotSplit(String)
        public var description: String {
            switch self {
            case let .missing(path): return "prepare: input '\(path)' does not exist"
            case let .notARegularFile(path, what): return "prepare: input '\(path)' is \(what)"
            case let .empty(what): return "prepare: \(what) holds no text"
            case let .cannotSplit(reason): return "prepare: \(reason)"
            }
        }
    }

    /// Regular files under the given paths (folders are walked), sorted, deduplicated.
    public static func collectFiles(_ paths: [String]) throws -> [String] {
        var files: [String] = []
        for path in paths {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { throw PrepareError.missing(path) }
            if isDirectory.boolValue {
                let enumerator = FileManager.default.enumerator(atPath: path)
                while let relative = enumerator?.nextObject() as? String {
                    let full = (path as NSString).appendingPathComponent(relative)
                    // Regular files only: a FIFO or socket in the folder would block the read.
                    if RegularFile.problem(full) == nil,
                       !relative.split(separator: "/").contains(where: { $0.hasPrefix(".") }) {
                        files.append(full)
                    }
                }
            } else {
                files.append(path)
            }
        }
        return Array(Set(files)).sorted()
    }

    public static func prepare(inputs: [String], valInputs: [String], output: String, valFraction: Double,
                               tokenizer choice: TokenizerChoice = .bytes) throws -> Summary {
        let (trainTexts, valTexts, trainFiles, valFiles) = try split(inputs: inputs, valInputs: valInputs, valFraction: valFraction)
        let trainByteCount = trainTexts.reduce(0) { $0 + $1.count }, valByteCount = valTexts.reduce(0) { $0 + $1.count }
        guard trainByteCount > 0 else { throw PrepareError.empty("the training split") }
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        var summary = Summary(trainFiles: trainFiles, valFiles: valFiles, trainTokens: 0, valTokens: 0,
                              trainBytes: trainByteCount, valBytes: valByteCount)
        let tokenizer: Tokenizer
        switch choice {
        case .bytes:
            tokenizer = ByteTokenizer()
        case let .bpe(vocabularySize):
            let started = DispatchTime.now().uptimeNanoseconds
            let learned = try BytePairEncoding.learn(from: trainTexts, vocabularySize: vocabularySize)
            summary.learnSeconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
            summary.vocabularySize = learned.vocabularySize
            try learned.json().write(toFile: (output as NSString).appendingPathComponent(Tokenizers.fileName), atomically: true, encoding: .utf8)
            // A fresh copy, so the encode time is not helped by a cache warmed while learning.
            tokenizer = try BytePairEncoding(tokenBytes: learned.tokenBytes, merges: learned.merges)
        }
        let started = DispatchTime.now().uptimeNanoseconds
        let trainTokens = trainTexts.flatMap { tokenizer.encode($0) }, valTokens = valTexts.flatMap { tokenizer.encode($0) }
        summary.encodeSeconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        summary.trainTokens = trainTokens.count
        summary.valTokens = valTokens.count
        try TokenFile.write(tokens: trainTokens.map(UInt16.init), vocabularySize: tokenizer.vocabularySize,
                            to: (output as NSString).appendingPathComponent("train.bin"))
        try TokenFile.write(tokens: valTokens.map(UInt16.init), vocabularySize: tokenizer.vocabularySize,
                            to: (output as NSString).appendingPathComponent("val.bin"))
        return summary
    }

    /// With `valInputs`, those files are the validation set. Otherwise `valFraction` of the files
    /// (at least one, chosen at evenly spaced positions of the sorted list) go to validation; a
    /// single file is split at a line boundary instead. Returns each side's texts and files.
    static func split(inputs: [String], valInputs: [String], valFraction: Double) throws
        -> (train: [[UInt8]], val: [[UInt8]], trainFiles: [String], valFiles: [String]) {
        let explicitVal = try collectFiles(valInputs)
        var trainFiles = try collectFiles(inputs).filter { !explicitVal.contains($0) }
        var valFiles = explicitVal
        guard !trainFiles.isEmpty else { throw PrepareError.empty("the input list") }
        if valFiles.isEmpty && valFraction > 0 {
            if trainFiles.count == 1 {
                let bytes = try read(trainFiles[0])
                var cut = Int(Double(bytes.count) * (1 - valFraction))
                while cut < bytes.count && cut > 0 && bytes[cut - 1] != 10 { cut += 1 }
                guard cut > 0 && cut < bytes.count else { throw PrepareError.cannotSplit("'\(trainFiles[0])' is too short to split") }
                return ([Array(bytes[..<cut])], [Array(bytes[cut...])], trainFiles, trainFiles)
            }
            let valCount = min(trainFiles.count - 1, max(1, Int((valFraction * Double(trainFiles.count)).rounded())))
            let stride = Double(trainFiles.count) / Double(valCount)
            let picked = Set((0..<valCount).map { Int((Double($0) + 0.5) * stride) })
            valFiles = picked.sorted().map { trainFiles[$0] }
            trainFiles = trainFiles.enumerated().filter { !picked.contains($0.offset) }.map(\.element)
        }
        return (try trainFiles.map(read), try valFiles.map(read), trainFiles, valFiles)
    }

    static func read(_ path: String) throws -> [UInt8] {
        switch RegularFile.problem(path) {
        case nil: break
        case .missing?: throw PrepareError.missing(path)
        case let problem?: throw PrepareError.notARegularFile(path: path, what: "\(problem)")
        }
        guard let data = FileManager.default.contents(atPath: path) else { throw PrepareError.missing(path) }
        return [UInt8](data)
    }
}
