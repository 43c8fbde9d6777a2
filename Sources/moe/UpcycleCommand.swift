import ArgumentParser
import Foundation
import MoECore
import MoEIO

struct UpcycleCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upcycle", abstract: "Turn a dense model into an MoE model: every FFN copied into E experts behind a fresh router.",
        discussion: """
            FROM is a SwiftMoE checkpoint (or run directory) of a dense model (model.moe_every 0), or a
            transformers directory of a dense Llama, Mistral or Qwen3 model. Every block becomes an MoE of
            --experts copies of its FFN, routed softmax top-k renormalised over the k: with identical
            copies the MoE computes the dense model's function. --diversify makes the copies differ as
            EvoMoE's spawn does (each weight kept with probability 1 - mask ratio, rescaled, plus noise).
            Writes OUTPUT/checkpoints/step_00000000; continue with `moe train --run-dir OUTPUT --resume`.
            """)

    @Option(name: .customLong("from"), help: ArgumentHelp("A dense SwiftMoE checkpoint or run directory, or a transformers directory.", valueName: "dir"))
    var source: String

    @Option(help: ArgumentHelp("The new run directory.", valueName: "dir"))
    var output: String

    @Option(parsing: .unconditional, help: "Experts per MoE layer.")
    var experts: Int

    @Option(name: .customLong("top-k"), parsing: .unconditional, help: "Experts per token.")
    var topK = 1

    @Flag(help: "Make the copies differ as EvoMoE's spawn does (--mask-ratio, --noise).")
    var diversify = false

    @Option(name: .customLong("mask-ratio"), parsing: .unconditional, help: "With --diversify: the probability that a weight is masked.")
    var maskRatio = 0.5

    @Option(parsing: .unconditional, help: "With --diversify: noise N(0, (noise * rms W)^2) added to every weight.")
    var noise = 0.01

    @Option(name: .customLong("set"), help: ArgumentHelp("Override one key of the MoE config, e.g. --set moe.capacity_factor=1.25 (repeatable).", valueName: "key=value"))
    var overrides: [String] = []

    func validate() throws {
        guard experts >= 1 else { throw ValidationError("--experts must be at least 1 (got \(experts))") }
        guard (1...experts).contains(topK) else { throw ValidationError("--top-k must be between 1 and --experts \(experts) (got \(topK))") }
        guard (0..<1).contains(maskRatio), noise >= 0, noise.isFinite else { throw ValidationError("--mask-ratio must be in [0, 1) and --noise >= 0") }
    }

    func run() throws {
        Runtime.run { communicator in
            guard communicator.rank == 0 else { return }
            var settings: EvoMoEConfig?
            if diversify {
                settings = EvoMoEConfig()
                (settings!.maskRatio, settings!.noise, settings!.rescale) = (maskRatio, noise, true)
            }
            let isTransformers = FileManager.default.fileExists(atPath: (source as NSString).appendingPathComponent("config.json"))
            let (checkpoint, config, notes) = try Upcycling.upcycle(
                from: source, checkpoint: isTransformers ? nil : try LoadedCheckpoint.resolve(source), to: output,
                options: Upcycling.Options(experts: experts, topK: topK, diversify: settings), overrides: overrides)
            for note in notes { print("note: \(note)") }
            print("upcycled \(source) to \(checkpoint): \(ModelDescription(config))")
        }
    }
}
