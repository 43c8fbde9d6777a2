import MoEIO

/// Batches of (input, target) sequences from one or more token files (shards). T = sequence
/// length, B = sequences per rank, R = ranks.
///
/// The windows of all shards are numbered one after the other (a window never crosses a shard
/// boundary). Training sequence g (0 ≤ g < R·B) of step s starts at a uniform random window drawn
/// from `key.derive(s)` at counter g. The global batch therefore depends only on the seed and the
/// step, never on R: rank r takes sequences r·B ..< (r+1)·B, so R ranks see exactly the batch one
/// rank with batch R·B would see, and a resumed run continues the same data order.
public final class TokenBatches {
    public let shards: [TokenFile]
    public let length: Int
    let key: RandomKey
    /// [shards + 1]: the first global window of each shard; the last entry is the total.
    let windowStarts: [Int]

    /// The data's name for messages: the file, or the first of N shards.
    public var path: String { shards.count == 1 ? shards[0].path : "\(shards[0].path) and \(shards.count - 1) more shards" }

    public enum DataError: Error, CustomStringConvertible {
        case tooSmall(path: String, tokens: Int, needed: Int)
        case vocabularyMismatch(path: String, file: Int, model: Int)
        public var description: String {
            switch self {
            case let .tooSmall(path, tokens, needed):
                return "token file '\(path)': \(tokens) tokens is too few for one sequence of model.context + 1 = \(needed) tokens"
            case let .vocabularyMismatch(path, file, model):
                return "token file '\(path)': vocabulary size \(file) does not match the model's \(model)"
            }
        }
    }

    public convenience init(file: TokenFile, length: Int, seed: Int) throws {
        try self.init(files: [file], length: length, seed: seed)
    }

    public init(files: [TokenFile], length: Int, seed: Int) throws {
        precondition(!files.isEmpty, "at least one token file")
        var starts = [0]
        for file in files { starts.append(starts.last! + max(0, file.tokens.count - length)) }
        guard starts.last! > 0 else {
            throw DataError.tooSmall(path: files[0].path, tokens: files.map(\.tokens.count).max() ?? 0, needed: length + 1)
        }
        shards = files
        windowStarts = starts
        self.length = length
        key = RandomKey(UInt64(seed)).derive("data")
    }

    /// Windows that start a sequence, over all shards (per shard: offsets 0 ... tokens - T - 1).
    var windowCount: Int { windowStarts.last! }

    /// The shard and offset of global window `window`.
    func locate(_ window: Int) -> (shard: TokenFile, offset: Int) {
        var low = 0, high = shards.count - 1
        while low < high {
            let middle = (low + high + 1) / 2
            if windowStarts[middle] <= window { low = middle } else { high = middle - 1 }
        }
        return (shards[low], window - windowStarts[low])
    }

    /// inputs, targets: [B*T] for this rank's part of step `step`'s global batch.
    public func trainingBatch(step: Int, rank: Int, batchSize: Int, inputs: inout [Int32], targets: inout [Int32]) {
        let stepKey = key.derive(step)
        fill(batchSize: batchSize, inputs: &inputs, targets: &targets) { sequence in
            stepKey.integer(rank * batchSize + sequence, below: windowCount)
        }
    }

    /// Evaluation batch `index` of `batches`: R·B·batches windows evenly spaced over the file,
    /// the same for every evaluation so validation losses are comparable across steps.
    public func evaluationBatch(index: Int, batches: Int, rank: Int, ranks: Int, batchSize: Int,
                                inputs: inout [Int32], targets: inout [Int32]) {
        let total = batches * ranks * batchSize
        fill(batchSize: batchSize, inputs: &inputs, targets: &targets) { sequence in
            let global = (index * ranks + rank) * batchSize + sequence
            return Int((Double(global) + 0.5) * Double(self.windowCount) / Double(total))
        }
    }

    private func fill(batchSize: Int, inputs: inout [Int32], targets: inout [Int32], window: (Int) -> Int) {
        let count = batchSize * length
        if inputs.count != count { inputs = Array(repeating: 0, count: count) }
        if targets.count != count { targets = Array(repeating: 0, count: count) }
        inputs.withUnsafeMutableBufferPointer { input in
            targets.withUnsafeMutableBufferPointer { target in
                for sequence in 0..<batchSize {
                    let (shard, start) = locate(window(sequence))
                    let source = shard.tokens
                    for position in 0..<length {
                        input[sequence * length + position] = Int32(source[start + position])
                        target[sequence * length + position] = Int32(source[start + position + 1])
                    }
                }
            }
        }
    }
}

/// A run's data: the training and validation batches, the vocabulary they imply (the config's
/// `model.vocab_size`, or 0 for the largest file header's) and the training tokens' counts per
/// id (hash routing's balanced table), counted in one streaming pass over the shards.
struct TrainingData {
    let train: TokenBatches
    let validation: TokenBatches?
    let vocabularySize: Int
    let frequencies: [Int]

    init(config: RunConfig, trainFiles: [TokenFile], validationFiles: [TokenFile], ranks: Int) throws {
        let dataVocabulary = trainFiles.map(\.vocabularySize).max() ?? 256
        let vocabularySize = config.model.vocabularySize > 0 ? config.model.vocabularySize : dataVocabulary
        for file in trainFiles + validationFiles where file.vocabularySize > vocabularySize {
            throw TokenBatches.DataError.vocabularyMismatch(path: file.path, file: file.vocabularySize, model: vocabularySize)
        }
        // Before anything of the vocabulary's size is allocated (a header may declare 2^31 ids).
        let localExperts = max(1, (config.moe.experts + ranks - 1) / ranks)
        try ModelSize(config, vocabularySize: vocabularySize, localExperts: localExperts).check(config, vocabularySize: vocabularySize)
        var frequencies = [Int](repeating: 0, count: vocabularySize)
        for file in trainFiles { file.forEachChunk { for token in $0 { frequencies[Int(token)] += 1 } } }
        let length = config.model.context, seed = config.train.seed
        train = try TokenBatches(files: trainFiles, length: length, seed: seed)
        validation = validationFiles.isEmpty ? nil : try TokenBatches(files: validationFiles, length: length, seed: seed)
        self.vocabularySize = vocabularySize
        self.frequencies = frequencies
    }
}
