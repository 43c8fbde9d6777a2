#if canImport(Glibc)
import Glibc
#endif
import MoEComm
import MoEIO

/// `moe bench`: this process's sgemm peak, then timed training steps, as one JSON object.
public enum Benchmark {
    /// Best-of-repeats GFLOP/s of a row-major product [m, k] x [k, n], the shape of the model's
    /// largest GEMMs (B*T tokens against the width and the expert hidden size): OpenBLAS sgemm
    /// for fp32, oneDNN on bf16 inputs for bf16. All ranks measure at the same time, so the
    /// figure includes the contention of a real step.
    public static func gemmPeak(_ precision: Precision, m: Int, n: Int, k: Int, repeats: Int = 20,
                                communicator: Communicator) throws -> Double {
        let a = Tensor<Float>(rows: m, columns: k), b = Tensor<Float>(rows: k, columns: n), c = Tensor<Float>(rows: m, columns: n)
        for index in 0..<a.count { a.pointer[index] = Float(index % 7) * 0.01 }
        for index in 0..<b.count { b.pointer[index] = Float(index % 5) * 0.01 }
        let product: () -> Void
        switch precision {
        case .fp32: product = { gemm(m: m, n: n, k: k, a: a.pointer, b: b.pointer, c: c.pointer) }
        case .bf16:
            let matmul = try BFloat16Matmul()
            let left = matmul.left.round(a.pointer, count: a.count), right = matmul.right.round(b.pointer, count: b.count)
            product = { matmul.gemm(m: m, n: n, k: k, a: left, b: right, c: c.pointer) }
        }
        for _ in 0..<3 { product() }
        try communicator.barrier()
        var best = Double.infinity
        for _ in 0..<repeats {
            let started = Clock.nanoseconds()
            product()
            best = min(best, Double(Clock.nanoseconds() - started) * 1e-9)
        }
        return 2 * Double(m * n * k) / best / 1e9
    }

    /// GEMM peaks of this machine, GFLOP/s summed over ranks: fp32 always, bf16 where the CPU
    /// has it.
    public struct Peaks {
        public var fp32: Double
        public var bf16: Double?

        public static func measure(_ config: RunConfig, communicator: Communicator) throws -> Peaks {
            let (m, n, k) = (config.train.batchSize * config.model.context, config.model.ffnHidden, config.model.width)
            let fp32 = try communicator.allReduce(gemmPeak(.fp32, m: m, n: n, k: k, communicator: communicator))
            guard BFloat16Support.current.supported else { return Peaks(fp32: fp32, bf16: nil) }
            return Peaks(fp32: fp32, bf16: try communicator.allReduce(gemmPeak(.bf16, m: m, n: n, k: k, communicator: communicator)))
        }
    }

    /// Model FLOPs per token at the gate's nominal k experts per token in every MoE layer:
    /// 6 x active parameters plus causal attention (`GPTModel.trainingFlops`).
    public static func modelFlopsPerToken(_ model: GPTModel<Float>) -> Double {
        model.trainingFlops(tokens: 1, expertAssignments: Int64(model.moeLayers.count * model.moeConfig.topK))
    }

    /// The documented memory model, in MiB, for this rank: 16 bytes per parameter held
    /// (value, gradient, two AdamW moments; 2 more for the bf16 copy in bf16 mode; a sharded
    /// optimizer keeps the moments, and in bf16 the fp32 values, of its replicated slice only)
    /// plus the activations and scratch kept per token,
    /// in floats: per layer 12C (residual stream and norms 4C, QKV and head outputs 4C, their
    /// gradient scratch 4C) + nh·T (attention probabilities) + k(9C + 3H) (dispatched, received,
    /// regrouped and returned rows and their gradients; hidden pre-activation, GELU output and
    /// its gradient); plus 3C + V per token outside the layers.
    public static func memoryModelMiB(_ trainer: Trainer) -> Double {
        let model = trainer.model, config = model.config
        let c = Double(config.width), h = Double(config.ffnHidden), k = Double(model.moeConfig.topK)
        let tokens = Double(trainer.batchSize * config.context)
        // Gradients (4 bytes) of every parameter, the bf16 copy (2) in bf16 mode; fp32 values (4)
        // and AdamW moments (8) of the experts and of what this rank keeps of the replicated ones.
        let all = Double(model.replicated.count + model.experts.count)
        let parameters = all * (model.precision == .bf16 ? 6 : 4) + Double(model.experts.count) * 12
            + replicatedOptimizerStateBytes(trainer)
            + (model.precision == .bf16 ? 0 : Double(model.replicated.count) * 4)
        // Attention keeps nh·T probabilities per token, or only nh log-sum-exps when tiled.
        let tiled = config.context > trainer.config.train.attentionTile
        let perLayer = 12 * c + Double(config.heads * (tiled ? 1 : config.context)) + k * (9 * c + 3 * h)
        let activations = tokens * (Double(config.layers) * perLayer + 3 * c + Double(model.vocabularySize)) * 4
        return (parameters + activations) / 1_048_576
    }

    /// The replicated parameters' optimizer state on this rank, in bytes: the AdamW moments of its
    /// slice and, in bf16 mode, the fp32 master values it keeps (ZeRO's 12 bytes per parameter in
    /// mixed precision; fp32 mode has no copy besides the values the model computes with).
    public static func replicatedOptimizerStateBytes(_ trainer: Trainer) -> Double {
        let moments = Double(trainer.replicatedOptimizer.shard.count) * 8
        guard trainer.model.precision == .bf16 else { return moments }
        let masters = trainer.model.replicated.keptValues?.reduce(0) { $0 + $1.count } ?? trainer.model.replicated.count
        return moments + Double(masters) * 4
    }

    /// Peak resident memory of this process, in MiB.
    public static func peakResidentMiB() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_maxrss) / 1024   // Linux reports KiB
    }

    /// Times `steps` training steps after `warmup` untimed ones. Returns the JSON object (the
    /// same on every rank; rank 0 prints it). MFU is against the peak of the precision trained in.
    public static func run(trainer: Trainer, steps: Int, warmup: Int, dataDescription: String, peaks: Peaks) throws -> (json: JSONObject, tokensPerSecond: Double) {
        let communicator = trainer.communicator
        let precision = trainer.model.precision
        let peak = precision == .bf16 ? peaks.bf16 ?? peaks.fp32 : peaks.fp32
        trainer.separateWaiting = communicator.size > 1
        for _ in 0..<warmup { _ = try trainer.trainStep() }
        try communicator.barrier()
        var profile = StepProfile()
        let started = Clock.nanoseconds()
        for _ in 0..<steps { profile += try trainer.trainStep().profile }
        try communicator.barrier()
        let seconds = Double(Clock.nanoseconds() - started) * 1e-9
        // Per-part times averaged over ranks (peaks were summed when measured); memory maximum.
        var sums = StepProfile.summed.map { profile[keyPath: $0] }
        try communicator.allReduce(&sums)
        let peakMemory = try communicator.allReduce(peakResidentMiB(), op: .max)
        var mean = StepProfile()
        for (part, sum) in zip(StepProfile.summed, sums) { mean[keyPath: part] = sum / Double(communicator.size) }
        let tokensPerSecond = Double(steps * trainer.globalBatchTokens) / seconds
        let flopsPerToken = modelFlopsPerToken(trainer.model)
        let achieved = tokensPerSecond * flopsPerToken / 1e9
        var object = JSONObject()
        object.add("ranks", communicator.size)
        object.add("blas_core", BLASInfo.coreName)
        object.add("blas_threads", BLASInfo.threads)
        object.add("precision", precision.rawValue)
        object.add("bf16_isa", BFloat16Support.current.isa)
        object.add("steps", steps)
        object.add("global_batch_tokens", trainer.globalBatchTokens)
        object.add("data", dataDescription)
        object.add("tokens_per_sec", tokensPerSecond.rounded())
        object.add("model_flops_per_token", flopsPerToken)
        object.add("achieved_gflops", (achieved * 10).rounded() / 10)
        object.add("sgemm_peak_gflops", (peaks.fp32 * 10).rounded() / 10)
        if let bf16 = peaks.bf16 { object.add("bf16_peak_gflops", (bf16 * 10).rounded() / 10) }
        object.add("mfu", (achieved / peak * 1000).rounded() / 1000)
        object.add("peak_rss_mib", peakMemory.rounded())
        let modelled = try communicator.allReduce(memoryModelMiB(trainer), op: .max)
        object.add("memory_model_mib", modelled.rounded())
        object.add("memory_ratio", (peakMemory / modelled * 100).rounded() / 100)
        // The replicated parameters' optimizer state on this rank (about halved on 2 ranks by train.shard_optimizer).
        let optimizerState = replicatedOptimizerStateBytes(trainer) / 1_048_576
        object.add("replicated_optimizer_state_mib", (try communicator.allReduce(optimizerState, op: .max) * 10).rounded() / 10)
        object.add("step_ms", (seconds / Double(steps) * 1e4).rounded() / 10)
        var parts = JSONObject()
        for (name, value) in mean.parts { parts.add(name, (value / Double(steps) * 1e4).rounded() / 10) }
        object.addRaw("step_ms_by_part", parts.text)
        // Transfers (all-to-alls and all-reduces): from start to completion, and the part of it
        // a rank spent blocked (equal while every transfer is blocking).
        var communication = JSONObject()
        communication.add("total", (mean.totalCommunication / Double(steps) * 1e4).rounded() / 10)
        communication.add("exposed", (mean.exposedCommunication / Double(steps) * 1e4).rounded() / 10)
        object.addRaw("communication_ms", communication.text)
        return (object, tokensPerSecond)
    }
}
