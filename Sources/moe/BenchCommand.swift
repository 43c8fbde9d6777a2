import ArgumentParser
import Foundation
import MoEComm
import MoECore
import MoEIO

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure training speed: this machine's sgemm peak, then timed steps; prints one JSON line.",
        discussion: """
            Run alone or under mpirun. Without --config, configs/bench.yaml (relative to the working directory) is
            used if present, else the embedded defaults (the same model). When data.train is missing the steps run on
            random bytes, which times the same work. Fields: ranks, blas_core, blas_threads, tokens_per_sec (global),
            model_flops_per_token (6 x active parameters + 6 L T C), achieved_gflops, peak_gflops_by_kernel (OpenBLAS
            fp32, oneDNN fp32 and, where the CPU has it, oneDNN bf16; summed over ranks), fp32_peak_gflops and
            bf16_peak_gflops (the best kernel of each), kernels (which kernel the products used: matrix_products,
            attention_heads, router), kernel_choice (the start-up measurement and decision), precision, mfu (achieved /
            the best peak of the precision trained in), warning (when the products' kernel runs more than 10% below the
            best one of its precision on the model's products, forward and both gradients, as measured at start; also on
            stderr), peak_rss_mib (largest rank), step_ms and step_ms_by_part (mean over ranks: attention, the five MoE
            stages, output, all_reduce, optimizer, waiting, other), outside_attention_experts_ms and _share (the parts
            but attention, experts and waiting, and their share of step_ms), waiting_ms_by_place
            (the waiting part at the forward MoE exchanges, the backward ones, and before the gradient sums).
            With --precision both, one object {"fp32": {...}, "bf16": {...}, "bf16_speedup": tokens/s ratio}, both runs
            in the same process after the same peak measurements.
            """)

    @Option(help: ArgumentHelp("YAML run config (default: configs/bench.yaml).", valueName: "file"))
    var config: String?

    @Option(name: .customLong("set"), help: ArgumentHelp("Override one config key (repeatable).", valueName: "key=value"))
    var overrides: [String] = []

    @Option(help: ArgumentHelp("fp32, bf16, both, or auto (default: the config's train.precision).", valueName: "precision"))
    var precision: String?

    @Option(parsing: .unconditional, help: "Timed steps.")
    var steps: Int = 20

    @Option(parsing: .unconditional, help: "Untimed warm-up steps.")
    var warmup: Int = 3

    func validate() throws {
        guard steps > 0, warmup >= 0 else { throw ValidationError("--steps must be > 0 and --warmup >= 0") }
        if let precision, !["auto", "fp32", "bf16", "both"].contains(precision) {
            throw ValidationError("--precision '\(precision)': expected auto, fp32, bf16 or both")
        }
    }

    func run() throws {
        Runtime.run { communicator in
            let file = config ?? (FileManager.default.fileExists(atPath: "configs/bench.yaml") ? "configs/bench.yaml" : nil)
            var resolved = try RunConfig.load(file: file, overrides: overrides)
            resolved.checkpoint.every = 0
            // The config's data when it is there (a damaged file is still an error), else synthetic.
            var shards: [TokenFile]?
            do { shards = try TokenFile.read(patterns: resolved.data.train, key: "data.train") } catch let error as TokenFile.ReadError {
                switch error {
                case .unreadable, .noMatch: shards = nil
                default: throw error
                }
            }
            let trainFiles: [TokenFile]
            let description: String
            if let shards, !shards.isEmpty {
                trainFiles = shards
                description = resolved.data.train.joined(separator: ", ")
            } else {
                var state: UInt64 = 0x9E37_79B9_7F4A_7C15
                let tokens = (0..<(1 << 20)).map { _ -> UInt16 in
                    state = state &* 6364136223846793005 &+ 1442695040888963407
                    return UInt16(state >> 56)
                }
                trainFiles = [TokenFile(path: "synthetic", tokens: tokens, vocabularySize: 256)]
                description = "synthetic random bytes"
            }
            if let warning = BLASInfo.genericCoreWarning() { Runtime.note(warning, communicator: communicator) }
            var peaks = try Benchmark.Peaks.measure(resolved, communicator: communicator)
            func bench(_ precision: PrecisionSetting) throws -> (json: JSONObject, tokensPerSecond: Double) {
                var config = resolved
                config.train.precision = precision
                let trainer = try Trainer(config: config, communicator: communicator, trainFiles: trainFiles, validationFiles: [])
                if let kernels = trainer.model.kernels { Runtime.note(kernels.summary, communicator: communicator) }
                let result = try Benchmark.run(trainer: trainer, steps: steps, warmup: warmup, dataDescription: description, peaks: &peaks)
                if let warning = result.warning { Runtime.note(warning, communicator: communicator) }
                return (result.json, result.tokensPerSecond)
            }
            let line: String
            if precision == "both" {
                let fp32 = try bench(.fp32), bf16 = try bench(.bf16)
                var object = JSONObject()
                object.addRaw("fp32", fp32.json.text)
                object.addRaw("bf16", bf16.json.text)
                object.add("bf16_speedup", (bf16.tokensPerSecond / fp32.tokensPerSecond * 1000).rounded() / 1000)
                line = object.text
            } else {
                line = try bench(precision.flatMap(PrecisionSetting.init(rawValue:)) ?? resolved.train.precision).json.text
            }
            if communicator.rank == 0 { print(line) }
        }
    }
}
