import ArgumentParser
import Foundation
import MoECore

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export", abstract: "Write a checkpoint's model in another format (Hugging Face).",
        discussion: """
            --format hf writes OUTPUT/model.safetensors (weights only, the experts of every rank merged),
            config.json and the tokenizer. A model.architecture llama model becomes one of transformers'
            own classes (Mixtral, Qwen3-MoE or OLMoE, by its query/key norm and MoE layers; see
            docs/EXPORT.md), loadable with AutoModelForCausalLM.from_pretrained(OUTPUT); a gpt2 model
            adds modeling_swiftmoe.py and loads with trust_remote_code=True. The exported model
            routes without a capacity limit.
            """)

    enum Format: String, ExpressibleByArgument, CaseIterable { case hf }
    enum DataType: String, ExpressibleByArgument, CaseIterable { case f32, bf16 }

    @Option(help: ArgumentHelp("A checkpoint directory, or a run directory (its newest complete checkpoint).", valueName: "dir"))
    var checkpoint: String

    @Option(help: "Output format.")
    var format: Format = .hf

    @Option(help: ArgumentHelp("Output directory.", valueName: "dir"))
    var output: String

    @Option(help: "Weight type in model.safetensors (bf16 rounds to nearest even).")
    var dtype: DataType = .f32

    func run() throws {
        Runtime.run { communicator in
            guard communicator.rank == 0 else { return }
            let directory = try LoadedCheckpoint.resolve(checkpoint)
            let summary = try HuggingFaceExport.export(checkpoint: directory, manifest: try Checkpoint.readManifest(directory), to: output,
                                                       dataType: dtype == .f32 ? .f32 : .bf16)
            print("exported \(directory) to \(output): \(summary)")
        }
    }
}
