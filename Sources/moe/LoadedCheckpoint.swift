import ArgumentParser
import Foundation
import MoEComm
import MoECore
import MoEIO

/// A model rebuilt from a checkpoint's own config and loaded with its weights (no optimizer).
struct LoadedCheckpoint {
    let directory: String
    let manifest: CheckpointManifest
    let config: RunConfig
    let model: GPTModel<Float>
    /// The run's tokenizer, if it had one (byte-level models need none).
    let tokenizer: TokenizerFile?

    /// `path` is a checkpoint directory or a run directory (then its newest complete checkpoint).
    init(_ path: String, communicator: Communicator) throws {
        directory = try Self.resolve(path)
        manifest = try Checkpoint.readManifest(directory)
        config = try Checkpoint.config(of: manifest, directory: directory)
        model = try GPTModel<Float>(config, vocabularySize: manifest.vocabularySize, communicator: communicator)
        try Checkpoint.load(directory, manifest: manifest, model: model)
        tokenizer = try Checkpoint.tokenizer(directory, manifest: manifest)
    }

    /// A checkpoint directory as given, or a run directory's newest complete checkpoint.
    static func resolve(_ path: String) throws -> String {
        if FileManager.default.fileExists(atPath: (path as NSString).appendingPathComponent(Checkpoint.manifestFile)) { return path }
        if let newest = Checkpoint.complete(in: path).last { return newest }
        throw CheckpointError.notACheckpoint(path: path, reason: "neither a checkpoint directory nor a run directory with a complete checkpoint")
    }

    /// `--tokenizer` if given, else the checkpoint's own, else bytes for a byte-level model.
    func textTokenizer(override path: String?) throws -> Tokenizer {
        let chosen: Tokenizer
        if let path {
            chosen = try Tokenizers.load(path)
        } else if let tokenizer {
            chosen = tokenizer.tokenizer
        } else if model.vocabularySize == 256 {
            chosen = ByteTokenizer()
        } else {
            throw ValidationError("checkpoint '\(directory)' has a vocabulary of \(model.vocabularySize) tokens and no tokenizer; pass --tokenizer FILE (a tokenizer.json, or llm.c's gpt2_tokenizer.bin)")
        }
        guard chosen.vocabularySize <= model.vocabularySize else {
            throw TokenizerError.vocabularyMismatch(path: path ?? tokenizer?.path ?? "bytes", tokenizer: chosen.vocabularySize, model: model.vocabularySize)
        }
        return chosen
    }
}
