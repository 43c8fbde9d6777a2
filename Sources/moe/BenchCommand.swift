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
            model_flops_per_token (6 x active parameters + 6 L T C), achieved_gflops, sgemm_peak_gflops (summed over
            ranks), mfu (achieved / peak), peak_rss_mib (largest rank), step_ms and step_ms_by_part (mean over ranks).
            """)

    @Option(help: ArgumentHelp("YAML run config (default: configs/bench.yaml).", valueName: "file"))
    var config: String?

    @Option(name: .customLong("set"), help: ArgumentHelp("Override one config key (repeatable).", valueName: "key=value"))
    var overrides: [String] = []

    @Option(help: "Timed steps.")
    var steps: Int = 20

    @Option(help: "Untimed warm-up steps.")
    var warmup: Int = 3

    func validate() throws {
        guard steps > 0, warmup >= 0 else { throw ValidationError("--steps must be > 0 and --warmup >= 0") }
    }

    func run() throws {
        Runtime.run { communicator in
            let file = config ?? (FileManager.default.fileExists(atPath: "configs/bench.yaml") ? "configs/bench.yaml" : nil)
            var resolved = try RunConfig.load(file: file, overrides: overrides)
            resolved.checkpoint.every = 0
            let trainFile: TokenFile
            let description: String
            if FileManager.default.fileExists(atPath: resolved.data.train) {
                trainFile = try TokenFile.read(resolved.data.train)
                description = resolved.data.train
            } else {
                var state: UInt64 = 0x9E37_79B9_7F4A_7C15
                let tokens = (0..<(1 << 20)).map { _ -> UInt16 in
                    state = state &* 6364136223846793005 &+ 1442695040888963407
                    return UInt16(state >> 56)
                }
                trainFile = TokenFile(path: "synthetic", tokens: tokens, vocabularySize: 256)
                description = "synthetic random bytes"
            }
            let trainer = try Trainer(config: resolved, communicator: communicator, trainFile: trainFile, validationFile: nil)
            let line = try Benchmark.run(trainer: trainer, steps: steps, warmup: warmup, dataDescription: description)
            if communicator.rank == 0 { print(line) }
        }
    }
}
