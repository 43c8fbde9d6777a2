import ArgumentParser
import Foundation
import MoEComm
import MoECore

struct CheckpointCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoint", abstract: "Inspect or verify checkpoints.",
        subcommands: [Inspect.self, Verify.self])

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Summarise a checkpoint: step, world size, parameter counts, files, per-expert weight norms.")

        @Argument(help: ArgumentHelp("A checkpoint directory, or a run directory (its newest complete checkpoint).", valueName: "dir"))
        var directory: String

        func run() throws {
            Runtime.run { _ in
                let loaded = try LoadedCheckpoint(directory, communicator: SingleRankCommunicator())
                let manifest = loaded.manifest, model = loaded.model
                print("checkpoint \(loaded.directory)")
                print("step \(manifest.step), tokens seen \(manifest.tokensSeen), saved on \(manifest.worldSize) rank(s), seed \(manifest.seed), next lr \(manifest.learningRate)")
                let counts = model.parameterCounts
                print("parameters: \(counts.total) total, \(counts.active) active per token (replicated \(model.replicated.count), experts \(model.experts.count))")
                print("model: width \(loaded.config.model.width), layers \(loaded.config.model.layers), heads \(loaded.config.model.heads), vocabulary \(model.vocabularySize); moe: \(loaded.config.moe.experts) experts, gate \(loaded.config.moe.gate.rawValue), top-\(loaded.config.moe.topK)")
                for (name, record) in manifest.files.sorted(by: { $0.key < $1.key }) {
                    print("  \(name): \(record.bytes) bytes, sha256 \(record.sha256)")
                }
                // Norm of every expert's parameters, per MoE layer.
                var norms: [String: [Int: Double]] = [:]
                for entry in model.experts.entries {
                    let parts = entry.name.split(separator: ".")
                    guard let index = parts.firstIndex(of: "experts"), index + 1 < parts.count, let expert = Int(parts[index + 1]) else { continue }
                    let layer = parts[..<index].joined(separator: ".")
                    norms[layer, default: [:]][expert, default: 0] += Kernels.sumOfSquares(model.experts.values + entry.offset, count: entry.count)
                }
                for (layer, experts) in norms.sorted(by: { $0.key < $1.key }) {
                    let text = experts.sorted { $0.key < $1.key }.map { String(format: "%d:%.3f", $0.key, $0.value.squareRoot()) }
                    print("  \(layer) expert norms \(text.joined(separator: " "))")
                }
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check every file's size and SHA-256 against the manifest; exit non-zero on any mismatch.")

        @Argument(help: ArgumentHelp("A checkpoint directory.", valueName: "dir"))
        var directory: String

        func run() throws {
            Runtime.run { _ in
                let manifest = try Checkpoint.readManifest(directory)
                let problems = Checkpoint.verify(directory, manifest: manifest)
                guard problems.isEmpty else {
                    throw CheckpointError.corrupt(path: directory, reason: problems.joined(separator: "; "))
                }
                print("checkpoint \(directory): \(manifest.files.count) files verified (step \(manifest.step))")
            }
        }
    }
}
