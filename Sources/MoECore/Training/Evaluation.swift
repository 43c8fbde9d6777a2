import MoEComm
import MoEIO

/// Validation: the mean cross-entropy over fixed evaluation windows, and the bytes of text
/// behind them (for nats per byte). Collective: every rank scores its share of each batch.
public enum Evaluation {
    /// Mean cross-entropy over `batches` global batches of `data`'s evaluation windows (the
    /// model's evaluation capacity factor applies).
    public static func loss(model: GPTModel<Float>, data: TokenBatches, batches: Int, batchSize: Int,
                            communicator: Communicator, step: Int = 0) throws -> Double {
        var inputs: [Int32] = [], targets: [Int32] = []
        let length = data.length, localTokens = batchSize * length, globalTokens = communicator.size * localTokens
        var lossSum = 0.0
        for index in 0..<batches {
            data.evaluationBatch(index: index, batches: batches, rank: communicator.rank, ranks: communicator.size,
                                 batchSize: batchSize, inputs: &inputs, targets: &targets)
            let result = try model.forward(tokens: inputs, targets: targets, batch: batchSize, length: length, training: false,
                                           globalTokens: globalTokens, firstGlobalToken: communicator.rank * localTokens,
                                           noiseKey: RandomKey(0).derive("evaluation").derive(index), step: step)
            lossSum += result.localLossSum
        }
        return try communicator.allReduce(lossSum) / Double(batches * globalTokens)
    }

    /// Bytes of text behind the targets `loss` scores with the same arguments, summed over
    /// ranks: the loss times the tokens over this is nats per byte, comparable across tokenizers.
    public static func bytes(data: TokenBatches, batches: Int, batchSize: Int, communicator: Communicator,
                             tokenizer: Tokenizer) throws -> Int {
        let lengths = (0..<tokenizer.vocabularySize).map { tokenizer.decode(Int32($0)).count }
        var inputs: [Int32] = [], targets: [Int32] = []
        var bytes = 0
        for index in 0..<batches {
            data.evaluationBatch(index: index, batches: batches, rank: communicator.rank, ranks: communicator.size,
                                 batchSize: batchSize, inputs: &inputs, targets: &targets)
            for target in targets { bytes += lengths.indices.contains(Int(target)) ? lengths[Int(target)] : 0 }
        }
        return Int(try communicator.allReduce(Int64(bytes)))
    }
}
