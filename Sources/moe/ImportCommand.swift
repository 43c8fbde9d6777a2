import ArgumentParser
import Foundation
import MoECore
import MoEIO

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import", abstract: "Make a transformers model directory the first checkpoint of a new run.",
        discussion: """
            Reads DIR/config.json and DIR/model.safetensors (or the shards of
            model.safetensors.index.json; F32, BF16 or F16) of a Mixtral, Qwen3-MoE or OLMoE model, or of a
            dense Llama, Mistral or Qwen3 model, and writes OUTPUT/checkpoints/step_00000000 with fresh
            optimizer state. Continue with `moe train --run-dir OUTPUT --resume` (any number of ranks; the
            schedule and data come from that command's config), or `moe eval` / `moe generate` it. The
            tokenizer comes along where SwiftMoE runs it (byte-level BPE). A long context is cut to 4096
            positions; --set model.context=N chooses.
            """)

    @Option(name: .customLong("from"), help: ArgumentHelp("A transformers model directory.", valueName: "dir"))
    var source: String

    @Option(help: ArgumentHelp("The new run directory.", valueName: "dir"))
    var output: String

    @Option(name: .customLong("set"), help: ArgumentHelp("Override one key of the derived config, e.g. --set moe.capacity_factor=1.25 (repeatable).", valueName: "key=value"))
    var overrides: [String] = []

    func run() throws {
        Runtime.run { communicator in
            guard communicator.rank == 0 else { return }
            let (checkpoint, config, notes) = try HuggingFaceImport.importModel(from: source, to: output, overrides: overrides)
            for note in notes { print("note: \(note)") }
            print("imported \(source) to \(checkpoint): \(ModelDescription(config))")
        }
    }
}

/// One line on a model: architecture, size and routing.
struct ModelDescription: CustomStringConvertible {
    let config: RunConfig
    init(_ config: RunConfig) { self.config = config }
    var description: String {
        let model = config.model, moe = config.moe, expertHidden = moe.expertHidden ?? model.ffnHidden
        var routing = model.moeEvery == 0 ? "dense"
            : "\(moe.experts) experts of hidden \(expertHidden) per MoE block (every \(model.moeEvery)), top-\(moe.topK)"
        if model.moeEvery > 0 && moe.sharedExperts > 0 {
            routing += ", \(moe.sharedExperts) shared of hidden \(moe.sharedHidden ?? expertHidden)\(moe.sharedGate ? ", gated" : "")"
        }
        return "\(model.architecture.rawValue), \(model.layers) blocks of width \(model.width), \(model.heads) heads "
            + "(\(model.keyValueHeads) key/value), FFN \(model.ffnHidden), context \(model.context), vocabulary \(model.vocabularySize); \(routing)"
    }
}
