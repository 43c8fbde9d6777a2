import Foundation

/// Turns text files into byte-level token files, split into training and validation by file
/// (a document is never on both sides).
public enum DatasetPreparation {
    public struct Summary: CustomStringConvertible {
        public var trainFiles: [String]
        public var valFiles: [String]
        public var trainTokens: Int
        public var valTokens: Int
        public var description: String {
            "train: \(trainFiles.count) files, \(trainTokens) tokens; val: \(valFiles.count) files, \(valTokens) tokens"
        }
    }

    public enum PrepareError: Error, CustomStringConvertible {
        case missing(String)
        case empty(String)
        case cannotSplit(String)
        public var description: String {
            switch self {
            case let .missing(path): return "prepare: input '\(path)' does not exist"
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
                    var childIsDirectory: ObjCBool = false
                    if FileManager.default.fileExists(atPath: full, isDirectory: &childIsDirectory), !childIsDirectory.boolValue,
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

    /// With `valInputs`, those files are the validation set. Otherwise `valFraction` of the files
    /// (at least one, chosen at evenly spaced positions of the sorted list) go to validation; a
    /// single file is split at a line boundary instead.
    public static func prepare(inputs: [String], valInputs: [String], output: String, valFraction: Double) throws -> Summary {
        let trainFiles0 = try collectFiles(inputs)
        let explicitVal = try collectFiles(valInputs)
        var trainFiles = trainFiles0.filter { !explicitVal.contains($0) }
        var valFiles = explicitVal
        guard !trainFiles.isEmpty else { throw PrepareError.empty("the input list") }
        var trainBytes: [UInt16] = [], valBytes: [UInt16] = []
        if valFiles.isEmpty && valFraction > 0 {
            if trainFiles.count == 1 {
                let bytes = try read(trainFiles[0])
                var cut = Int(Double(bytes.count) * (1 - valFraction))
                while cut < bytes.count && cut > 0 && bytes[cut - 1] != 10 { cut += 1 }
                guard cut > 0 && cut < bytes.count else { throw PrepareError.cannotSplit("'\(trainFiles[0])' is too short to split") }
                trainBytes = bytes[..<cut].map(UInt16.init)
                valBytes = bytes[cut...].map(UInt16.init)
                valFiles = trainFiles
            } else {
                let valCount = min(trainFiles.count - 1, max(1, Int((valFraction * Double(trainFiles.count)).rounded())))
                let stride = Double(trainFiles.count) / Double(valCount)
                let picked = Set((0..<valCount).map { Int((Double($0) + 0.5) * stride) })
                valFiles = picked.sorted().map { trainFiles[$0] }
                trainFiles = trainFiles.enumerated().filter { !picked.contains($0.offset) }.map(\.element)
            }
        }
        if trainBytes.isEmpty {
            for file in trainFiles { trainBytes += try read(file).map(UInt16.init) }
            for file in valFiles { valBytes += try read(file).map(UInt16.init) }
        }
        guard !trainBytes.isEmpty else { throw PrepareError.empty("the training split") }
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        try TokenFile.write(tokens: trainBytes, vocabularySize: 256, to: (output as NSString).appendingPathComponent("train.bin"))
        try TokenFile.write(tokens: valBytes, vocabularySize: 256, to: (output as NSString).appendingPathComponent("val.bin"))
        return Summary(trainFiles: trainFiles, valFiles: valFiles, trainTokens: trainBytes.count, valTokens: valBytes.count)
    }

    static func read(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else { throw PrepareError.missing(path) }
        return [UInt8](data)
    }
}
