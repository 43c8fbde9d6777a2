import ArgumentParser
import Foundation
import MoEComm
import MoECore
import MoEIO

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval", abstract: "Print the validation loss and perplexity of a checkpoint.")

    @Option(help: ArgumentHelp("A checkpoint directory, or a run directory (its newest complete checkpoint).", valueName: "dir"))
    var checkpoint: String

    @Option(help: ArgumentHelp("Token file or glob to evaluate on (default: the checkpoint config's data.val).", valueName: "path"))
    var data: String?

    @Option(parsing: .unconditional, help: "Global batches of evaluation windows (default: the checkpoint config's train.eval_batches).")
    var batches: Int?

    @Flag(help: "Print one JSON object (full precision) instead of the text line.")
    var json = false

    func run() throws {
        Runtime.run { communicator in
            let loaded = try LoadedCheckpoint(checkpoint, communicator: communicator)
            let patterns = data.map { [$0] } ?? loaded.config.data.val
            guard !patterns.isEmpty else { throw ValidationError("the checkpoint's config has no data.val; pass --data") }
            let files = try TokenFile.read(patterns: patterns, key: data == nil ? "data.val" : "--data")
            for file in files where file.vocabularySize > loaded.model.vocabularySize {
                throw TokenBatches.DataError.vocabularyMismatch(path: file.path, file: file.vocabularySize, model: loaded.model.vocabularySize)
            }
            let windows = try TokenBatches(files: files, length: loaded.config.model.context, seed: 0)
            let path = windows.path
            let batchCount = batches ?? loaded.config.train.evalBatches
            guard batchCount > 0 else { throw ValidationError("--batches must be positive") }
            let loss = try Evaluation.loss(model: loaded.model, data: windows, batches: batchCount,
                                            batchSize: loaded.config.train.batchSize, communicator: communicator,
                                            step: loaded.manifest.step)
            let tokens = batchCount * communicator.size * loaded.config.train.batchSize * loaded.config.model.context
            var line = String(format: "step %d | val_loss %.4f | perplexity %.3f | %d tokens of %@", loaded.manifest.step, loss, exp(loss), tokens, path)
            var record = MetricsRecord(step: loaded.manifest.step)
            (record.validationLoss, record.perplexity, record.tokens, record.data) = (loss, exp(loss), tokens, path)
            // Nats per byte of text compare models with different tokenizers (a byte model's
            // loss already is one).
            if let tokenizer = try? loaded.textTokenizer(override: nil), loaded.model.vocabularySize != 256 {
                let bytes = try Evaluation.bytes(data: windows, batches: batchCount, batchSize: loaded.config.train.batchSize,
                                                       communicator: communicator, tokenizer: tokenizer)
                let perByte = loss * Double(tokens) / Double(bytes)
                line += String(format: " | %.4f nats per byte (%.3f bytes per token)", perByte, Double(bytes) / Double(tokens))
                (record.natsPerByte, record.bytes) = (perByte, bytes)
            }
            if json { line = record.jsonLine }
            Runtime.logger(communicator)(line)
        }
    }
}
