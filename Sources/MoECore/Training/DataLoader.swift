import MoEIO

/// Batches of (input, target) sequences from a token file. T = sequence length, B = sequences
/// per rank, R = ranks.
///
/// Training sequence g (0 ≤ g < R·B) of step s starts at a uniform random offset drawn from
/// `key.derive(s)` at counter g. The global batch therefore depends only on the seed and the
/// step, never on R: rank r takes sequences r·B ..< (r+1)·B, so R ranks see exactly the batch one
/// rank with batch R·B would see, and a resumed run continues the same data order.
public final class TokenBatches {
    public let tokens: [UInt16]
    public let path: String
    public let length: Int
    let key: RandomKey

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

    public init(file: TokenFile, length: Int, seed: Int) throws {
        guard file.tokens.count >= length + 1 else {
            throw DataError.tooSmall(path: file.path, tokens: file.tokens.count, needed: length + 1)
        }
        tokens = file.tokens
        path = file.path
        self.length = length
        key = RandomKey(UInt64(seed)).derive("data")
    }

    /// Windows that start a sequence: offsets 0 ... tokens - T - 1.
    var windowCount: Int { tokens.count - length }

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

    private func fill(batchSize: Int, inputs: inout [Int32], targets: inout [Int32], offset: (Int) -> Int) {
        let count = batchSize * length
        if inputs.count != count { inputs = Array(repeating: 0, count: count) }
        if targets.count != count { targets = Array(repeating: 0, count: count) }
        tokens.withUnsafeBufferPointer { source in
            inputs.withUnsafeMutableBufferPointer { input in
                targets.withUnsafeMutableBufferPointer { target in
                    for sequence in 0..<batchSize {
                        let start = offset(sequence)
                        for position in 0..<length {
                            input[sequence * length + position] = Int32(source[start + position])
                            target[sequence * length + position] = Int32(source[start + position + 1])
                        }
                    }
                }
            }
        }
    }
}
