#if canImport(Glibc)
import Glibc
#endif
import MoEComm
import MoEIO

/// `moe bench`: this machine's GEMM peak per kernel, then timed training steps, as one JSON object.
public enum Benchmark {
    /// The candidate kernels of a product: OpenBLAS sgemm and oneDNN's matmul in fp32, oneDNN
    /// on bf16 inputs.
    public enum Kernel: String, CaseIterable, Sendable {
        case openBLASFP32 = "openblas_fp32", oneDNNFP32 = "onednn_fp32", oneDNNBF16 = "onednn_bf16"
        public var precision: Precision { self == .oneDNNBF16 ? .bf16 : .fp32 }
    }

    /// GEMM peaks of this machine per kernel, GFLOP/s summed over ranks (bf16 where the CPU has
    /// it), and the best of each precision: the denominator of MFU, whatever kernel the model chose.
    public struct Peaks {
        public var byKernel: [Kernel: Double]

        public init(byKernel: [Kernel: Double]) { self.byKernel = byKernel }

        /// Best-of-repeats speed of each kernel on the model's largest GEMM shape ([B*T, C] x
        /// [C, H], forward), bf16 on operands rounded beforehand (the kernel's own peak). All ranks
        /// measure at the same time, so the figure includes the contention of a real step.
        public static func measure(_ config: RunConfig, communicator: Communicator) throws -> Peaks {
            let shape = ProductShapes(shapes: [SIMD3(config.train.batchSize * config.model.context, config.model.ffnHidden, config.model.width)])
            try communicator.barrier()
            let summed = try KernelMeasurement.measure(shapes: shape, products: [.forward], budget: 0.3, roundingActivations: false)
                .summed(over: communicator)
            var byKernel: [Kernel: Double] = [.openBLASFP32: summed.openBLASFP32, .oneDNNFP32: summed.oneDNNFP32]
            byKernel[.oneDNNBF16] = summed.oneDNNBF16
            return Peaks(byKernel: byKernel)
        }

        /// Each kernel's faster figure of the two: a window in which the machine ran slow (a
        /// cold or descheduled core) lowers one measurement, and a low peak would inflate MFU.
        public func merged(with other: Peaks) -> Peaks {
            Peaks(byKernel: byKernel.merging(other.byKernel) { max($0, $1) })
        }

        /// The best peak of `precision` over the kernels that run it (nil: none here).
        public func best(_ precision: Precision) -> Double? {
            byKernel.filter { $0.key.precision == precision }.values.max()
        }
    }

    /// The kernel the model's large products run on.
    public static func kernel(of model: GPTModel<Float>) -> Kernel {
        model.precision == .bf16 ? .oneDNNBF16 : (model.kernels?.floatKernel == .onednn ? .oneDNNFP32 : .openBLASFP32)
    }

    /// A warning when the model's products run more than 10% below the best kernel of their
    /// precision on the model's own products (forward and both gradients: the start-up
    /// measurement, `KernelChoice`). Not on the peaks: a kernel fast forward can be the slower
    /// one over a step (oneDNN's fp32 on AVX2, whose weight gradients lag OpenBLAS's).
    public static func kernelWarning(_ kernel: Kernel, measured: KernelMeasurement) -> String? {
        let figures = Kernel.allCases.compactMap { candidate in measured.figure(candidate).map { (candidate, $0) } }
            .filter { $0.0.precision == kernel.precision }
        guard let chosen = measured.figure(kernel), let fastest = figures.max(by: { $0.1 < $1.1 }), chosen < 0.9 * fastest.1 else { return nil }
        return String(format: "warning: the products run on %@ at %.1f GFLOP/s per rank, %.0f%% below %@ (%.1f) on the model's products",
                      kernel.rawValue, chosen, (1 - chosen / fastest.1) * 100, fastest.0.rawValue, fastest.1)
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
    /// same on every rank; rank 0 prints it). MFU is against the peak of the precision trained in:
    /// the peaks are measured again after the steps (the machine warm) and each kernel keeps its
    /// best figure, in `peaks` too for a later run. `warning`: the chosen kernel ran more than 10%
    /// below the best on the model's products (also in the JSON), for the log.
    public static func run(trainer: Trainer, steps: Int, warmup: Int, dataDescription: String,
                           peaks: inout Peaks) throws -> (json: JSONObject, tokensPerSecond: Double, warning: String?) {
        let communicator = trainer.communicator
        let precision = trainer.model.precision
        let kernel = kernel(of: trainer.model)
        let (seconds, mean) = try timeSteps(trainer, steps: steps, warmup: warmup)
        peaks = peaks.merged(with: try Peaks.measure(trainer.config, communicator: communicator))
        let peak = peaks.best(precision) ?? peaks.byKernel[kernel]!
        let peakMemory = try communicator.allReduce(peakResidentMiB(), op: .max)
        let tokensPerSecond = Double(steps * trainer.globalBatchTokens) / seconds
        let flopsPerToken = modelFlopsPerToken(trainer.model)
        let achieved = tokensPerSecond * flopsPerToken / 1e9
        var object = JSONObject()
        object.add("ranks", communicator.size)
        object.add("blas_core", BLASInfo.coreName)
        object.add("blas_threads", BLASInfo.threads)
        object.add("onednn_threads", BLASInfo.oneDNNThreads)
        object.add("precision", precision.rawValue)
        object.add("bf16_isa", BFloat16Support.current.isa)
        object.add("steps", steps)
        object.add("global_batch_tokens", trainer.globalBatchTokens)
        object.add("data", dataDescription)
        object.add("tokens_per_sec", tokensPerSecond.rounded())
        object.add("model_flops_per_token", flopsPerToken)
        object.add("achieved_gflops", (achieved * 10).rounded() / 10)
        let warning = addKernels(kernel, peaks: peaks, mfu: achieved / peak, choice: trainer.model.kernels, to: &object)
        object.add("peak_rss_mib", peakMemory.rounded())
        let modelled = try communicator.allReduce(memoryModelMiB(trainer), op: .max)
        object.add("memory_model_mib", modelled.rounded())
        object.add("memory_ratio", (peakMemory / modelled * 100).rounded() / 100)
        // The replicated parameters' optimizer state on this rank (about halved on 2 ranks by train.shard_optimizer).
        let optimizerState = replicatedOptimizerStateBytes(trainer) / 1_048_576
        object.add("replicated_optimizer_state_mib", (try communicator.allReduce(optimizerState, op: .max) * 10).rounded() / 10)
        addProfile(mean, seconds: seconds, steps: steps, to: &object)
        return (object, tokensPerSecond, warning)
    }

    /// The timed steps' profile, in milliseconds a step (to 0.1 ms): the step, its parts, the
    /// work outside attention and the experts, where the waiting was, the transfers and the MoE
    /// exchanges' bytes.
    static func addProfile(_ mean: StepProfile, seconds: Double, steps: Int, to object: inout JSONObject) {
        // Seconds summed over the timed steps, as milliseconds a step to 0.1 ms.
        let millisecondsPerStep = { (total: Double) in (total / Double(steps) * 1e4).rounded() / 10 }
        let step = millisecondsPerStep(seconds)
        object.add("step_ms", step)
        var parts = JSONObject()
        for (name, value) in mean.parts { parts.add(name, millisecondsPerStep(value)) }
        object.addRaw("step_ms_by_part", parts.text)
        let outside = millisecondsPerStep(mean.outsideAttentionAndExperts)
        object.add("outside_attention_experts_ms", outside)
        object.add("outside_attention_experts_share", (outside / step * 1000).rounded() / 1000)
        // Where the waiting was: at forward's MoE collectives (the routing statistics, the
        // experts' results coming back), backward's (what the deferred weight gradients left), or
        // before the gradient sums (the slower rank's leftover backward). Imbalance that moves
        // from layer to layer and step to step shows in the first two even when totals are equal.
        var waits = JSONObject()
        for (name, value) in [("forward_exchanges", mean.waitingInForward), ("backward_exchanges", mean.waitingInBackward),
                              ("gradient_sync", mean.waitingForGradients)] {
            waits.add(name, millisecondsPerStep(value))
        }
        object.addRaw("waiting_ms_by_place", waits.text)
        // Transfers (all-to-alls and all-reduces): from start to completion, and the part of it
        // a rank spent blocked (equal while every transfer is blocking).
        var communication = JSONObject()
        communication.add("total", millisecondsPerStep(mean.totalCommunication))
        communication.add("exposed", millisecondsPerStep(mean.exposedCommunication))
        object.addRaw("communication_ms", communication.text)
        // The MoE exchanges' bytes a rank sends to other ranks per step (forward and backward,
        // mean over ranks): what group-limited routing bounds.
        object.add("expert_mib_sent_per_rank", (mean.expertBytesSent / Double(steps) / 1_048_576 * 100).rounded() / 100)
    }

    /// Runs `warmup` untimed steps, then times `steps`; returns their seconds and the per-part
    /// times summed over the steps, averaged over ranks (the waiting probe times the wait for the
    /// slowest rank apart, on more than one rank).
    static func timeSteps(_ trainer: Trainer, steps: Int, warmup: Int) throws -> (seconds: Double, mean: StepProfile) {
        let communicator = trainer.communicator
        if communicator.size > 1 { trainer.hooks = WaitingProbe() }
        defer { trainer.hooks = nil }
        for _ in 0..<warmup { _ = try trainer.trainStep() }
        try communicator.barrier()
        var profile = StepProfile()
        let started = Clock.nanoseconds()
        for _ in 0..<steps { profile += try trainer.trainStep().profile }
        try communicator.barrier()
        let seconds = Double(Clock.nanoseconds() - started) * 1e-9
        var sums = StepProfile.summed.map { profile[keyPath: $0] }
        try communicator.allReduce(&sums)
        var mean = StepProfile()
        for (part, sum) in zip(StepProfile.summed, sums) { mean[keyPath: part] = sum / Double(communicator.size) }
        return (seconds, mean)
    }

    /// Which kernel each product used (the large products, attention, experts, dense FFNs and
    /// head, on the chosen one; attention's per-head products there or on oneDNN; the router's
    /// small fp32 product and one-row decoding on OpenBLAS), every kernel's peak, and the MFU
    /// against the best peak of the precision trained in, over every kernel: a slow kernel shows
    /// as a low MFU instead of hiding behind its own low peak. Returns the kernel warning, if any.
    static func addKernels(_ kernel: Kernel, peaks: Peaks, mfu: Double, choice: KernelChoice?, to object: inout JSONObject) -> String? {
        var kernels = JSONObject()
        kernels.add("matrix_products", kernel.rawValue)
        // Attention's per-head products: with the others, or batched on oneDNN where measured faster.
        kernels.add("attention_heads", (choice?.precision == .fp32 && choice?.headKernel == .onednn ? Kernel.oneDNNFP32 : kernel).rawValue)
        kernels.add("router", Kernel.openBLASFP32.rawValue)
        object.addRaw("kernels", kernels.text)
        var peakObject = JSONObject()
        for candidate in Kernel.allCases { if let value = peaks.byKernel[candidate] { peakObject.add(candidate.rawValue, (value * 10).rounded() / 10) } }
        object.addRaw("peak_gflops_by_kernel", peakObject.text)
        object.add("fp32_peak_gflops", ((peaks.best(.fp32) ?? 0) * 10).rounded() / 10)
        if let bf16 = peaks.best(.bf16) { object.add("bf16_peak_gflops", (bf16 * 10).rounded() / 10) }
        object.add("mfu", (mfu * 1000).rounded() / 1000)
        guard let choice else { return nil }
        let warning = kernelWarning(kernel, measured: choice.measurement)
        if let warning { object.add("warning", warning) }
        object.add("kernel_choice", choice.summary)
        return warning
    }
}

extension KernelMeasurement {
    /// This measurement's figure for `kernel` (nil: bf16 where the CPU has none).
    func figure(_ kernel: Benchmark.Kernel) -> Double? {
        switch kernel {
        case .openBLASFP32: openBLASFP32
        case .oneDNNFP32: oneDNNFP32
        case .oneDNNBF16: oneDNNBF16
        }
    }
}

/// The benchmark's hook: a barrier before each exchange and before the gradient all-reduce,
/// timed apart, so that `StepProfile.waiting` holds the wait for the slowest rank (expert load
/// imbalance) and the transfers only their own time.
final class WaitingProbe: TrainingHooks {
    func waitForSlowestRank(_ communicator: Communicator) throws -> Double {
        var seconds = 0.0
        try Clock.measure(&seconds) { try communicator.barrier() }
        return seconds
    }
}
