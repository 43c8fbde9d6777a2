import Foundation
import MoEComm
import MoEIO

/// Which library and number format run the model's matrix products, decided by measuring the
/// candidates on the model's own shapes: never by a CPU model number. (On one Intel Xeon bf16
/// products ran at half fp32's speed and oneDNN's fp32 beat OpenBLAS's best kernel; on AMD
/// Zen 4/5 bf16 runs at about twice fp32's speed. Only a measurement tells.)
///
/// The measurement takes a fraction of a second. It runs each library on the threads a step gives
/// it: one per rank, or a one-process run's cores. It is kept in a per-machine cache keyed by the
/// CPU, the libraries' kernels, the shapes and those threads (not by rank), so every later process
/// on the machine with the same model and threads, on any number of ranks, makes the same choice
/// and computes the same bits: a resumed run in particular, and 1 rank against R under mpirun.
public struct KernelChoice: Sendable, Equatable {
    public enum FloatKernel: String, Sendable { case openblas, onednn }

    public var precision: Precision
    /// The library of the fp32 products (bf16 products run on oneDNN).
    public var floatKernel: FloatKernel
    /// Where attention's per-(sequence, head) products run: oneDNN's batched matmul with the
    /// other products there, else where it measured faster than OpenBLAS's GEMM per head.
    public var headKernel: FloatKernel
    public var measurement: KernelMeasurement
    /// One line for the log: the figures and the choice.
    public var summary: String

    /// oneDNN's fp32 must beat OpenBLAS by this much to be chosen: OpenBLAS is also the Double
    /// reference of the gradient checks, and a near tie is not worth a second code path.
    public static let oneDNNMargin = 1.05
    /// bf16 must beat the fp32 kernel by this much under `precision: auto`: bf16 products cost
    /// accuracy, and the step's rounding passes are not in the product timings.
    public static let bfloat16Margin = 1.15

    /// The choice for `requested` given the measured speeds (pure: the tests force both outcomes).
    public static func decide(precision requested: PrecisionSetting, kernel: KernelSetting, measurement: KernelMeasurement,
                              support: BFloat16Support = .current) throws -> KernelChoice {
        let floatKernel: FloatKernel = switch kernel {
        case .openblas: .openblas
        case .onednn: .onednn
        case .auto: measurement.oneDNNFP32 >= oneDNNMargin * measurement.openBLASFP32 ? .onednn : .openblas
        }
        let fp32 = floatKernel == .onednn ? measurement.oneDNNFP32 : measurement.openBLASFP32
        let precision: Precision
        var headKernel = floatKernel
        var reason: String
        switch requested {
        case .fp32: (precision, reason) = (.fp32, "fp32 as configured")
        case .bf16:
            guard support.supported else { throw PrecisionError.unsupported(isa: support.isa) }
            (precision, reason) = (.bf16, "bf16 as configured")
        case .auto:
            if let bf16 = measurement.oneDNNBF16, support.supported {
                let ratio = String(format: "%.2f", bf16 / fp32)
                precision = bf16 >= bfloat16Margin * fp32 ? .bf16 : .fp32
                reason = precision == .bf16 ? "auto -> bf16 (\(ratio)x fp32, at least \(bfloat16Margin)x needed)"
                    : "auto -> fp32 (bf16 only \(ratio)x fp32, at least \(bfloat16Margin)x needed)"
            } else {
                (precision, reason) = (.fp32, "auto -> fp32 (no bf16 products on this CPU: oneDNN's instruction set is \(support.isa))")
            }
        }
        let kernelName = precision == .bf16 ? "oneDNN" : (floatKernel == .onednn ? "oneDNN" : "OpenBLAS")
        var heads = ""
        if precision == .fp32 && floatKernel == .openblas && kernel == .auto,
           let perHead = measurement.headProductsOpenBLAS, let batched = measurement.headProductsOneDNN {
            headKernel = batched * oneDNNMargin <= perHead ? .onednn : .openblas
            heads = headKernel == .onednn ? ", attention's per-head products on oneDNN" : ", attention's per-head products too"
        }
        let summary = "products: \(precision.rawValue) on \(kernelName)\(heads); precision \(reason); measured on the model's "
            + "shapes (forward and both gradients), GFLOP/s per rank\(measurement.threadsNote): \(measurement.description)"
        return KernelChoice(precision: precision, floatKernel: floatKernel, headKernel: precision == .bf16 ? .onednn : headKernel,
                            measurement: measurement, summary: summary)
    }

    /// Measures (or reads from the machine's cache) and decides. Collective: every rank calls it
    /// with the same config; all ranks average the figures and so make the same choice.
    /// `headProducts(matmul)`: seconds of a layer's attention per-head products on oneDNN's
    /// batched matmul (or, nil, OpenBLAS per head), timed where the run has them.
    public static func resolve(_ run: RunConfig, communicator: Communicator,
                               headProducts: ((OneDNNMatmul?) -> Double)? = nil) throws -> KernelChoice {
        let shapes = ProductShapes(run)
        // The head products are timed only where `decide` can use them: kernel auto, not forced bf16.
        let timesHeads = shapes.heads != nil && run.train.kernel == .auto && run.train.precision != .bf16
        let measurement = try KernelMeasurement.agreed(shapes: shapes, communicator: communicator,
                                                       headProducts: timesHeads ? headProducts : nil)
        return try decide(precision: run.train.precision, kernel: run.train.kernel, measurement: measurement)
    }
}

/// The model's main product shapes, [m, k] x [k, n]: the attention input projection over the
/// micro-batch and an expert's two products over its expected rows on one rank; and attention's
/// per-head products (batch, length, width, heads) where the run has them (not tiled).
public struct ProductShapes: Sendable, Hashable, CustomStringConvertible {
    public var shapes: [SIMD3<Int>]   // (m, n, k)
    public var heads: SIMD4<Int>?

    public init(_ run: RunConfig) {
        let tokens = run.train.batchSize * run.model.context, width = run.model.width, hidden = run.model.ffnHidden
        // On one rank each expert sees tokens·k/E rows per step (R times more on R ranks: the
        // smaller figure keeps the shapes, and so the cached choice, the same on any rank count).
        let expertRows = max(16, tokens * run.moe.topK / max(1, run.moe.experts))
        shapes = [SIMD3(tokens, 3 * width, width), SIMD3(expertRows, hidden, width), SIMD3(expertRows, width, hidden)]
        if run.model.context <= run.train.attentionTile {
            heads = SIMD4(run.train.batchSize, run.model.context, width, run.model.heads)
        }
    }

    public init(shapes: [SIMD3<Int>]) { self.shapes = shapes }

    public var flops: Double { shapes.reduce(0) { $0 + 2 * Double($1[0] * $1[1] * $1[2]) } }
    public var description: String {
        shapes.map { "\($0[0])x\($0[1])x\($0[2])" }.joined(separator: ",") + (heads.map { ",heads \($0[0])x\($0[1])x\($0[2])/\($0[3])" } ?? "")
    }
}

/// The three products of a linear layer's training step on a shape (m, n, k), x [m, k] times
/// W [k, n]: y = x W, dx = dy Wᵀ ([m, n] x [n, k]) and dW += xᵀ dy ([k, m] x [m, n]).
public enum StepProduct: CaseIterable, Sendable {
    case forward, inputGradient, weightGradient

    /// One product as a row-major GEMM; `roundsLeft`: in bf16 a step rounds its left operand
    /// for it (the weight gradient reads the copies the other two made).
    struct GEMM {
        var transposeA = false
        var transposeB = false
        var m: Int, n: Int, k: Int
        var beta: Float = 0
        var roundsLeft = true
    }

    func gemm(_ shape: SIMD3<Int>) -> GEMM {
        let (m, n, k) = (shape[0], shape[1], shape[2])
        return switch self {
        case .forward: GEMM(m: m, n: n, k: k)
        case .inputGradient: GEMM(transposeB: true, m: m, n: k, k: n)
        case .weightGradient: GEMM(transposeA: true, m: k, n: n, k: m, beta: 1, roundsLeft: false)
        }
    }
}

/// Measured speeds of the candidate kernels on one set of shapes, GFLOP/s per rank.
public struct KernelMeasurement: Sendable, Equatable, Codable, CustomStringConvertible {
    public var openBLASFP32: Double
    public var oneDNNFP32: Double
    /// nil where oneDNN has no bf16 products on this CPU.
    public var oneDNNBF16: Double?
    /// Milliseconds of one layer's attention per-head products, forward and backward, fp32: one
    /// GEMM per (sequence, head) on OpenBLAS, and oneDNN's batched matmul (nil: not timed).
    public var headProductsOpenBLAS: Double?, headProductsOneDNN: Double?
    /// Where the figures came from: "measured" or "cached" (not part of the cache entry's value).
    public var source = "measured"
    /// The threads each library ran on (`BLASInfo.stepThreads`; part of the cache entry's key).
    public var threads = 1
    var threadsNote: String { threads > 1 ? " on \(threads) threads" : "" }

    enum CodingKeys: String, CodingKey {
        case openBLASFP32 = "openblas_fp32", oneDNNFP32 = "onednn_fp32", oneDNNBF16 = "onednn_bf16"
        case headProductsOpenBLAS = "heads_openblas_ms", headProductsOneDNN = "heads_onednn_ms"
    }

    public init(openBLASFP32: Double, oneDNNFP32: Double, oneDNNBF16: Double?, headProducts: (openBLAS: Double, oneDNN: Double)? = nil,
                source: String = "measured") {
        self.openBLASFP32 = openBLASFP32
        self.oneDNNFP32 = oneDNNFP32
        self.oneDNNBF16 = oneDNNBF16
        (headProductsOpenBLAS, headProductsOneDNN) = (headProducts?.openBLAS, headProducts?.oneDNN)
        self.source = source
    }

    public var description: String {
        let bf16 = oneDNNBF16.map { String(format: "%.1f", $0) } ?? "n/a"
        var heads = ""
        if let perHead = headProductsOpenBLAS, let batched = headProductsOneDNN {
            heads = String(format: "; attention's per-head products, ms a layer: OpenBLAS %.2f, oneDNN %.2f", perHead, batched)
        }
        return String(format: "OpenBLAS (%@) fp32 %.1f, oneDNN fp32 %.1f, oneDNN bf16 %@%@ (%@)",
                      BLASInfo.coreName, openBLASFP32, oneDNNFP32, bf16, heads, source)
    }

    /// Times each kernel over `shapes`, each shape's `products` (by default all three a training
    /// step runs: a library fast forward can be slow on a transposed operand, as oneDNN's fp32
    /// weight gradients are on AVX2): best of several runs per product, each kernel given about
    /// `budget` seconds. bf16 includes rounding the activation operand of the forward and input
    /// gradient products, as a step does (the weights' copy exists, and the weight gradient reads
    /// copies made for the other two), unless `roundingActivations` is false (the kernel's own peak).
    /// `headProducts(matmul)` times attention's per-head products on each engine (nil: not timed).
    /// `beforeEachProduct` runs before every timed product, outside the timing: in a one-process
    /// run it wakes oneDNN's threads, as the step's element-wise passes do between its products.
    /// (They then poll their cores for a few milliseconds. OpenBLAS's own threads, timed alone,
    /// ran the expert products at full speed, but in the step they fought the polling threads for
    /// the cores: 313 ms of experts a step against 84 ms on oneDNN; AMD EPYC Zen 3, 2 cores.)
    public static func measure(shapes: ProductShapes, products: [StepProduct] = StepProduct.allCases, budget: Double = 0.08,
                               roundingActivations: Bool = true, headProducts: ((OneDNNMatmul?) -> Double)? = nil,
                               beforeEachProduct: () -> Void = {}) throws -> KernelMeasurement {
        let matmul = try OneDNNMatmul(precision: .fp32)
        let largest = shapes.shapes.reduce(0) { max($0, $1[0] * $1[2], $1[2] * $1[1], $1[0] * $1[1]) }
        let a = Tensor<Float>(rows: largest, columns: 1), b = Tensor<Float>(rows: largest, columns: 1)
        let c = Tensor<Float>(rows: largest, columns: 1)
        for index in 0..<largest { a.pointer[index] = Float(index % 7) * 0.01; b.pointer[index] = Float(index % 5) * 0.01 }
        let weights = BFloat16Buffer(), activations = BFloat16Buffer()
        weights.round(b.pointer, count: largest)
        activations.round(a.pointer, count: largest)
        let runs = shapes.shapes.flatMap { shape in products.map { $0.gemm(shape) } }
        func speed(_ product: (StepProduct.GEMM) -> Void) -> Double {
            var seconds = 0.0
            for gemm in runs {
                beforeEachProduct()
                product(gemm)   // warm-up: primitive creation, packing buffers
                var best = Double.infinity, spent = 0.0, repeats = 0
                while repeats < 3 || (spent < budget / Double(runs.count) && repeats < 50) {
                    beforeEachProduct()
                    let started = Clock.nanoseconds()
                    product(gemm)
                    let elapsed = Double(Clock.nanoseconds() - started) * 1e-9
                    best = min(best, elapsed)
                    spent += elapsed
                    repeats += 1
                }
                seconds += best
            }
            return shapes.flops * Double(products.count) / seconds / 1e9
        }
        let openBLAS = speed { g in
            gemm(transposeA: g.transposeA, transposeB: g.transposeB, m: g.m, n: g.n, k: g.k,
                 a: UnsafePointer(a.pointer), b: UnsafePointer(b.pointer), beta: g.beta, c: c.pointer)
        }
        let oneDNN = speed { g in
            matmul.gemm(transposeA: g.transposeA, transposeB: g.transposeB, m: g.m, n: g.n, k: g.k,
                        a: UnsafePointer(a.pointer), b: UnsafePointer(b.pointer), beta: g.beta, c: c.pointer)
        }
        var bf16: Double?
        if BFloat16Support.current.supported {
            bf16 = speed { g in
                let left = roundingActivations && g.roundsLeft ? matmul.left.round(a.pointer, count: g.m * g.k) : activations.pointer
                matmul.gemm(transposeA: g.transposeA, transposeB: g.transposeB, m: g.m, n: g.n, k: g.k,
                            a: UnsafePointer(left), b: UnsafePointer(weights.pointer), beta: g.beta, c: c.pointer)
            }
        }
        let heads = try headProducts.map { try measureHeadProducts($0, on: matmul) }
        return KernelMeasurement(openBLASFP32: openBLAS, oneDNNFP32: oneDNN, oneDNNBF16: bf16, headProducts: heads)
    }

    /// Milliseconds of a layer's attention per-head products: per head on OpenBLAS, batched on
    /// oneDNN (`matmul`, or a new fp32 engine).
    static func measureHeadProducts(_ time: (OneDNNMatmul?) -> Double,
                                    on matmul: OneDNNMatmul? = nil) throws -> (openBLAS: Double, oneDNN: Double) {
        let engine = try matmul ?? OneDNNMatmul(precision: .fp32)
        return (openBLAS: 1000 * time(nil), oneDNN: 1000 * time(engine))
    }

    mutating func setHeadProducts(_ figures: (openBLAS: Double, oneDNN: Double)) {
        (headProductsOpenBLAS, headProductsOneDNN) = (figures.openBLAS, figures.oneDNN)
    }

    /// The figures every rank uses: the machine cache's where every rank has an entry, else
    /// measured by all ranks at once (so contention is that of a real step); then averaged over
    /// ranks, so that all decide alike.
    public static func agreed(shapes: ProductShapes, communicator: Communicator,
                              headProducts: ((OneDNNMatmul?) -> Double)? = nil) throws -> KernelMeasurement {
        try BLASInfo.onStepThreads { threads in
            let cache = KernelCache(), key = KernelCache.key(shapes: shapes, threads: threads)
            let cached = cache.read(key)
            let everyRankCached = try communicator.allReduce(cached == nil ? 0 : 1, op: .min) == 1
            // An entry without the head products' figures, where they are wanted (written by a run
            // that did not time them), gets them; its other figures, and so the choice, stay.
            let missesHeads = headProducts != nil && cached?.headProductsOneDNN == nil
            let anyRankMissesHeads = try communicator.allReduce(missesHeads ? 1 : 0, op: .max) == 1
            var measurement: KernelMeasurement
            if everyRankCached, var cached {
                if anyRankMissesHeads, let headProducts {
                    try communicator.barrier()
                    cached.setHeadProducts(try measureHeadProducts(headProducts))
                }
                measurement = cached
            } else {
                try communicator.barrier()
                measurement = try measure(shapes: shapes, headProducts: headProducts, beforeEachProduct: BLASInfo.wakeOneDNNThreads)
            }
            var agreed = try measurement.summed(over: communicator, scale: 1 / Double(communicator.size))
            agreed.source = everyRankCached ? "cached in \(cache.file)" + (anyRankMissesHeads ? ", head products measured" : "") : "measured"
            agreed.threads = threads
            if !everyRankCached || anyRankMissesHeads { cache.write(key, agreed) }
            return agreed
        }
    }

    /// Each figure summed over ranks and multiplied by `scale` (1/R: the mean), bf16 only where
    /// every rank has it. Collective.
    public func summed(over communicator: Communicator, scale: Double = 1) throws -> KernelMeasurement {
        let hasBF16 = try communicator.allReduce(oneDNNBF16 == nil ? 0 : 1, op: .min) == 1
        let hasHeads = try communicator.allReduce(headProductsOneDNN == nil ? 0 : 1, op: .min) == 1
        var figures = [openBLASFP32, oneDNNFP32, oneDNNBF16 ?? 0, headProductsOpenBLAS ?? 0, headProductsOneDNN ?? 0]
        try communicator.allReduce(&figures)
        return KernelMeasurement(openBLASFP32: figures[0] * scale, oneDNNFP32: figures[1] * scale,
                                 oneDNNBF16: hasBF16 ? figures[2] * scale : nil,
                                 headProducts: hasHeads ? (figures[3] * scale, figures[4] * scale) : nil, source: source)
    }
}

/// The per-machine cache of kernel measurements: `$MOE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/swiftmoe/kernels.json`, else `~/.cache/swiftmoe/kernels.json`. A JSON object
/// from key to measurement. Unreadable or damaged files count as empty (the cache is only a
/// cache); writes go through a temporary file and a rename, so concurrent ranks never leave a
/// half-written file.
public struct KernelCache {
    public let file: String

    public init(environment: [String: String] = ProcessInfo.processInfo.environment) {
        if let path = environment["MOE_KERNEL_CACHE"], !path.isEmpty {
            file = path
        } else {
            let base = environment["XDG_CACHE_HOME"].flatMap { $0.isEmpty ? nil : $0 }
                ?? ((environment["HOME"] ?? NSTemporaryDirectory()) + "/.cache")
            file = base + "/swiftmoe/kernels.json"
        }
    }

    /// What makes figures comparable: the CPU, the libraries' kernels, the shapes, the products
    /// timed (entries from before the gradients' products were timed are measured again) and the
    /// threads they ran on (one: no mention, as in the entries from before threads counted).
    public static func key(shapes: ProductShapes, threads: Int = 1) -> String {
        "\(cpuModel)|OpenBLAS \(BLASInfo.coreName)|oneDNN \(BFloat16Support.current.isa)|\(shapes)|forward+gradients"
            + (threads > 1 ? "|\(threads) threads" : "")
    }

    static var cpuModel: String {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
              let colon = line.firstIndex(of: ":") else { return "unknown CPU" }
        return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }

    func entries() -> [String: KernelMeasurement] {
        guard let data = FileManager.default.contents(atPath: file),
              let entries = try? JSONDecoder().decode([String: KernelMeasurement].self, from: data) else { return [:] }
        return entries
    }

    public func read(_ key: String) -> KernelMeasurement? {
        entries()[key]
    }

    /// Best effort: a cache that cannot be written costs a measurement next time, nothing else.
    public func write(_ key: String, _ measurement: KernelMeasurement) {
        var all = entries()
        all[key] = measurement
        let directory = (file as NSString).deletingLastPathComponent
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        guard let data = try? JSONEncoder().encode(all) else { return }
        let temporary = file + ".\(getpid()).tmp"
        guard FileManager.default.createFile(atPath: temporary, contents: data) else { return }
        if rename(temporary, file) != 0 { unlink(temporary) }
    }
}

extension BLASInfo {
    /// OpenBLAS's kernels for CPUs without AVX (its fallback when it does not recognise a CPU).
    static let genericCores: Set<String> = ["prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai",
                                            "coppermine", "northwood", "banias", "opteron", "barcelona", "bobcat"]

    /// The OpenBLAS core that suits this CPU's features (from /proc/cpuinfo's flags), if it has AVX2.
    public static func suitedCore(flags: Set<Substring>) -> String? {
        if ["avx512f", "avx512bw", "avx512vl", "avx512dq"].allSatisfy(flags.contains) {
            return flags.contains("avx512_bf16") ? "Cooperlake" : "SkylakeX"
        }
        return flags.contains("avx2") && flags.contains("fma") ? "Haswell" : nil
    }

    /// A warning when OpenBLAS detected a generic core on a CPU with AVX2 or AVX-512 (it does not
    /// know the CPU), unless the user chose the core with OPENBLAS_CORETYPE.
    public static func genericCoreWarning(core: String = coreName, cpuFlags: Set<Substring>? = nil,
                                          coreTypeSet: Bool = getenv("OPENBLAS_CORETYPE") != nil) -> String? {
        guard !coreTypeSet, genericCores.contains(core.lowercased()) else { return nil }
        let flags = cpuFlags ?? Set(((try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? "")
            .split(separator: "\n").first { $0.hasPrefix("flags") }?.split(separator: " ") ?? [])
        guard let suited = suitedCore(flags: flags) else { return nil }
        return "warning: OpenBLAS does not recognise this CPU and runs its generic \(core) kernels; fp32 products go to oneDNN "
            + "where it measures faster (see the products line), and `export OPENBLAS_CORETYPE=\(suited)` gives OpenBLAS "
            + "the kernels this CPU's features allow"
    }
}
