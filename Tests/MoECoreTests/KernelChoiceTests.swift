import Foundation
import XCTest
@testable import MoECore
import MoEIO
import MoEComm
import CBLAS

/// The products' kernel and precision are decided by measured speed, and MFU is reported
/// against the best kernel of the precision trained in.
final class KernelChoiceTests: XCTestCase {
    let withBF16 = BFloat16Support(isa: "avx512_core_bf16", supported: true)

    func testAutoPrecisionTakesBF16OnlyWhereItMeasuresClearlyFaster() throws {
        // AMD Zen 4/5: bf16 about twice fp32.
        let zen = KernelMeasurement(openBLASFP32: 105, oneDNNFP32: 115, oneDNNBF16: 214)
        let fast = try KernelChoice.decide(precision: .auto, kernel: .auto, measurement: zen, support: withBF16)
        XCTAssertEqual(fast.precision, .bf16)
        XCTAssertTrue(fast.summary.contains("auto -> bf16 (1.86x fp32"), fast.summary)
        // Intel Xeon without AMX: bf16 at half fp32's speed.
        let xeon = KernelMeasurement(openBLASFP32: 150, oneDNNFP32: 168, oneDNNBF16: 77)
        let slow = try KernelChoice.decide(precision: .auto, kernel: .auto, measurement: xeon, support: withBF16)
        XCTAssertEqual(slow.precision, .fp32)
        XCTAssertTrue(slow.summary.contains("auto -> fp32 (bf16 only 0.46x fp32"), slow.summary)
        // Below the margin: not worth bf16's rounding.
        let close = KernelMeasurement(openBLASFP32: 100, oneDNNFP32: 90, oneDNNBF16: 110)
        XCTAssertEqual(try KernelChoice.decide(precision: .auto, kernel: .auto, measurement: close, support: withBF16).precision, .fp32)
        // Explicit choices stand whatever the figures.
        XCTAssertEqual(try KernelChoice.decide(precision: .bf16, kernel: .auto, measurement: xeon, support: withBF16).precision, .bf16)
        XCTAssertEqual(try KernelChoice.decide(precision: .fp32, kernel: .auto, measurement: zen, support: withBF16).precision, .fp32)
    }

    /// OpenBLAS on a generic core (its detection's fallback on a CPU it does not know) is several
    /// times slower than oneDNN: the fp32 products move to oneDNN. A near tie keeps OpenBLAS.
    func testFloatKernelIsTheFasterLibrary() throws {
        let generic = KernelMeasurement(openBLASFP32: 33, oneDNNFP32: 168, oneDNNBF16: 77)
        let choice = try KernelChoice.decide(precision: .auto, kernel: .auto, measurement: generic, support: withBF16)
        XCTAssertEqual(choice.floatKernel, .onednn)
        XCTAssertEqual(choice.precision, .fp32)
        XCTAssertTrue(choice.summary.hasPrefix("products: fp32 on oneDNN"), choice.summary)
        let tie = KernelMeasurement(openBLASFP32: 100, oneDNNFP32: 103, oneDNNBF16: nil)
        XCTAssertEqual(try KernelChoice.decide(precision: .fp32, kernel: .auto, measurement: tie, support: withBF16).floatKernel, .openblas)
        XCTAssertEqual(try KernelChoice.decide(precision: .fp32, kernel: .openblas, measurement: generic, support: withBF16).floatKernel, .openblas)
        XCTAssertEqual(try KernelChoice.decide(precision: .fp32, kernel: .onednn, measurement: tie, support: withBF16).floatKernel, .onednn)
    }

    /// A model whose products run on oneDNN in fp32 (attention's batched path included), or only
    /// attention's per-head products (`runHeadProducts`), computes the loss and gradients the
    /// OpenBLAS one does, up to summation order.
    func testOneDNNFloatProductsMatchOpenBLAS() throws {
        var run = RunConfig()
        run.model.context = 16; run.model.width = 32; run.model.layers = 2; run.model.heads = 2; run.model.ffnHidden = 64
        run.moe.experts = 4; run.moe.topK = 2; run.moe.gate = .topk; run.moe.capacityFactor = 4
        run.evomoe.spawnFraction = 0
        run.train.precision = .fp32
        let tokens: [Int32] = (0..<64).map { Int32(($0 * 37 + $0 / 3) % 256) }
        let targets: [Int32] = tokens.map { ($0 + 1) % 256 }
        var losses: [String: Double] = [:], gradients: [String: [Float]] = [:]
        for variant in ["openblas", "onednn", "heads"] {
            let kernel: KernelSetting = variant == "onednn" ? .onednn : .openblas
            run.train.kernel = kernel
            let model = try GPTModel<Float>(run, vocabularySize: 256, communicator: SingleRankCommunicator())
            XCTAssertEqual(model.kernels?.floatKernel.rawValue, kernel.rawValue)
            XCTAssertEqual(model.kernels?.headKernel.rawValue, kernel.rawValue, "a forced kernel runs every product")
            XCTAssertEqual(model.replicated.matmul != nil, kernel == .onednn)
            if variant == "heads" { model.replicated.runHeadProducts(on: try OneDNNMatmul(precision: .fp32)) }
            XCTAssertEqual(model.replicated.attentionMatmul != nil, variant != "openblas")
            model.initializeParameters(seed: 5)
            model.zeroGradients()
            losses[variant] = try model.forward(tokens: tokens, targets: targets, batch: 4, length: 16, training: true, globalTokens: 64,
                                               firstGlobalToken: 0, noiseKey: RandomKey(1)).localLoss
            try model.backward(globalTokens: 64)
            gradients[variant] = Array(UnsafeBufferPointer(start: model.replicated.gradients, count: model.replicated.count))
                + Array(UnsafeBufferPointer(start: model.experts.gradients, count: model.experts.count))
        }
        let reference = gradients["openblas"]!, scale = reference.map { abs($0) }.max()!
        XCTAssertGreaterThan(scale, 0)
        for variant in ["onednn", "heads"] {
            XCTAssertEqual(losses["openblas"]!, losses[variant]!, accuracy: 1e-5, variant)
            XCTAssertNotEqual(gradients[variant]!, reference, "\(variant): another summation order")
            for (a, b) in zip(reference, gradients[variant]!) { XCTAssertEqual(a, b, accuracy: 1e-4 * scale, variant) }
        }
    }

    /// Attention's per-head products leave OpenBLAS for oneDNN's batched matmul only where it
    /// measured at least 5% faster, under `kernel: auto`, while the other fp32 products stay on
    /// OpenBLAS; bf16 and oneDNN fp32 run them batched anyway.
    func testAttentionHeadProductsGoWhereTheyMeasureFaster() throws {
        func choice(_ perHead: Double, _ batched: Double, kernel: KernelSetting = .auto, precision: PrecisionSetting = .fp32,
                    bf16: Double? = nil) throws -> KernelChoice {
            let measured = KernelMeasurement(openBLASFP32: 90, oneDNNFP32: 80, oneDNNBF16: bf16, headProducts: (perHead, batched))
            return try KernelChoice.decide(precision: precision, kernel: kernel, measurement: measured, support: withBF16)
        }
        let faster = try choice(6.9, 5.8)
        XCTAssertEqual(faster.floatKernel, .openblas)
        XCTAssertEqual(faster.headKernel, .onednn)
        XCTAssertTrue(faster.summary.hasPrefix("products: fp32 on OpenBLAS, attention's per-head products on oneDNN;"), faster.summary)
        XCTAssertTrue(faster.summary.contains("ms a layer: OpenBLAS 6.90, oneDNN 5.80"), faster.summary)
        XCTAssertEqual(try choice(6.0, 5.8).headKernel, .openblas, "within the 5% margin")
        XCTAssertEqual(try choice(6.9, 5.8, kernel: .openblas).headKernel, .openblas, "forced: every product")
        XCTAssertEqual(try choice(5.0, 9.0, kernel: .onednn).headKernel, .onednn)
        XCTAssertEqual(try choice(5.0, 9.0, precision: .auto, bf16: 300).headKernel, .onednn, "bf16 products are oneDNN's")
    }

    /// oneDNN adds a linear layer's bias as it stores the product: the same fp32 addition, bit
    /// for bit, as a pass over the product after it (fp32, and bf16 where the CPU has it).
    func testOneDNNBiasEqualsAddingItAfterTheProduct() throws {
        let (m, n, k) = (37, 48, 64)
        func values(_ count: Int, _ stream: Int) -> [Float] { (0..<count).map { Float(RandomKey(11).derive(stream).normal($0)) } }
        let a = values(m * k, 0), b = values(k * n, 1), bias = values(n, 2)
        var precisions: [Precision] = [.fp32]
        if BFloat16Support.current.supported { precisions.append(.bf16) }
        for precision in precisions {
            let matmul = try OneDNNMatmul(precision: precision)
            var fused = [Float](repeating: 0, count: m * n), separate = fused
            a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in bias.withUnsafeBufferPointer { bias in
                matrixProduct(matmul, m: m, n: n, k: k, a: .values(a.baseAddress!), b: .values(b.baseAddress!), c: &fused,
                              bias: bias.baseAddress!)
                matrixProduct(matmul, m: m, n: n, k: k, a: .values(a.baseAddress!), b: .values(b.baseAddress!), c: &separate)
                Kernels.addBias(bias.baseAddress!, to: &separate, rows: m, columns: n)
            } } }
            XCTAssertEqual(fused, separate, "\(precision)")
            XCTAssertNotEqual(fused[0], separate[0] - bias[0], "the bias was added")
        }
    }

    /// Float products with beta 0 large enough for OpenBLAS's level-3 driver clear C themselves
    /// (vector stores) and ask OpenBLAS for C += αAB: the same bits as OpenBLAS's own beta-0
    /// path, whatever C held before (NaN here), and the columns between n and the row stride
    /// left alone.
    func testBetaZeroProductsOverwriteCAndMatchOpenBLASBitForBit() {
        let (m, n, k, stride) = (257, 117, 263, 128)
        XCTAssertGreaterThanOrEqual(m * n * k, Float.driverProductSize)
        let key = RandomKey(11)
        let a = (0..<(m * k)).map { Float(key.uniform($0) * 2 - 1) }
        let b = (0..<(k * n)).map { Float(key.derive(1).uniform($0) * 2 - 1) }
        for (transposeA, transposeB) in [(false, false), (true, false), (false, true), (true, true)] {
            let (lda, ldb) = (transposeA ? m : k, transposeB ? k : n)
            var ours = [Float](repeating: .nan, count: m * stride), openBLAS = ours
            for row in 0..<m { for column in n..<stride { ours[row * stride + column] = 7; openBLAS[row * stride + column] = 7 } }
            Float.gemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, alpha: 0.5, a: a, lda: lda, b: b, ldb: ldb,
                       beta: 0, c: &ours, ldc: stride)
            cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                        Int32(m), Int32(n), Int32(k), 0.5, a, Int32(lda), b, Int32(ldb), 0, &openBLAS, Int32(stride))
            let differing = zip(ours, openBLAS).filter { $0.bitPattern != $1.bitPattern }.count
            XCTAssertEqual(differing, 0, "elements whose bits differ from OpenBLAS's, transposes \(transposeA), \(transposeB)")
            XCTAssertFalse(ours.contains { $0.isNaN }, "the NaNs C held are overwritten")
            XCTAssertEqual(ours.filter { $0 == 7 }.count, m * (stride - n), "the stride gap is left alone")
        }
    }

    /// MFU's denominator is the best peak of the precision trained in over every kernel, not the
    /// chosen kernel's own peak.
    func testMFUIsAgainstTheBestKernelOfThePrecision() {
        let peaks = Benchmark.Peaks(byKernel: [.openBLASFP32: 66, .oneDNNFP32: 336, .oneDNNBF16: 150])
        XCTAssertEqual(peaks.best(.fp32), 336)
        XCTAssertEqual(peaks.best(.bf16), 150)
        // A second measurement (moe bench measures again after its steps): each kernel keeps its
        // faster figure, so a slow window cannot lower the denominator.
        let again = peaks.merged(with: Benchmark.Peaks(byKernel: [.openBLASFP32: 70, .oneDNNFP32: 280]))
        XCTAssertEqual(again.byKernel, [.openBLASFP32: 70, .oneDNNFP32: 336, .oneDNNBF16: 150])
    }

    /// A kernel more than 10% below the best of its precision on the model's products (the
    /// start-up measurement: forward and both gradients) is named in a warning; the faster one,
    /// one within 10%, and the only bf16 kernel are not.
    func testASlowChosenKernelIsNamedInAWarning() {
        let generic = KernelMeasurement(openBLASFP32: 33, oneDNNFP32: 165, oneDNNBF16: 77)
        let warning = Benchmark.kernelWarning(.openBLASFP32, measured: generic)
        XCTAssertNotNil(warning)
        XCTAssertTrue(warning!.contains("openblas_fp32 at 33.0 GFLOP/s per rank, 80% below onednn_fp32 (165.0)"), warning!)
        XCTAssertNil(Benchmark.kernelWarning(.oneDNNFP32, measured: generic))
        XCTAssertNil(Benchmark.kernelWarning(.oneDNNBF16, measured: generic), "bf16 has one kernel")
        let near = KernelMeasurement(openBLASFP32: 152, oneDNNFP32: 165, oneDNNBF16: nil)
        XCTAssertNil(Benchmark.kernelWarning(.openBLASFP32, measured: near), "within 10% of the best")
    }

    /// The choice times every product a step runs on each shape (forward, input gradient, weight
    /// gradient), the peak only the forward one: the cache key says which.
    func testTheChoiceTimesTheGradientProductsToo() throws {
        let shape = SIMD3(64, 48, 32)
        let forward = StepProduct.forward.gemm(shape), input = StepProduct.inputGradient.gemm(shape)
        let weight = StepProduct.weightGradient.gemm(shape)
        XCTAssertEqual([forward.m, forward.n, forward.k], [64, 48, 32])
        XCTAssertEqual([input.m, input.n, input.k], [64, 32, 48])
        XCTAssertTrue(input.transposeB && !input.transposeA)
        XCTAssertEqual([weight.m, weight.n, weight.k], [32, 48, 64])
        XCTAssertTrue(weight.transposeA && weight.beta == 1 && !weight.roundsLeft)
        XCTAssertTrue(KernelCache.key(shapes: ProductShapes(shapes: [shape])).hasSuffix("|64x48x32|forward+gradients"))
        XCTAssertTrue(KernelCache.key(shapes: ProductShapes(shapes: [shape]), threads: 4).hasSuffix("|64x48x32|forward+gradients|4 threads"))
        // The step's surroundings (a one-process run's woken threads) come before every timed
        // product, warm-up included, of every kernel: three products, at least 3 timed runs each.
        var surroundings = 0
        let all = try KernelMeasurement.measure(shapes: ProductShapes(shapes: [shape]), budget: 0.001) { surroundings += 1 }
        XCTAssertGreaterThan(all.openBLASFP32, 0)
        XCTAssertGreaterThan(all.oneDNNFP32, 0)
        let kernels = BFloat16Support.current.supported ? 3 : 2
        XCTAssertGreaterThanOrEqual(surroundings, kernels * 3 * 4)
    }

    /// The cache: a measurement written is read back under its key; a damaged file is empty.
    func testKernelCacheRoundTripsAndSurvivesDamage() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kernel-cache-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: directory) }
        let cache = KernelCache(environment: ["MOE_KERNEL_CACHE": directory.appendingPathComponent("k.json").path])
        let measurement = KernelMeasurement(openBLASFP32: 1.5, oneDNNFP32: 2.5, oneDNNBF16: nil)
        XCTAssertNil(cache.read("a"))
        cache.write("a", measurement)
        cache.write("b", KernelMeasurement(openBLASFP32: 3, oneDNNFP32: 4, oneDNNBF16: 5))
        XCTAssertEqual(cache.read("a")?.oneDNNFP32, 2.5)
        XCTAssertNil(cache.read("a")?.oneDNNBF16)
        XCTAssertEqual(cache.read("b")?.oneDNNBF16, 5)
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: cache.file))
        XCTAssertNil(cache.read("a"))
    }

    /// A cached entry without the head products' figures (written by a run that did not time
    /// them) gets them from a run that wants them, timed alone: its other figures, and so the
    /// kernel choice, stay; the next run reads everything from the cache.
    func testACachedEntryWithoutHeadFiguresGetsOnlyThoseMeasured() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kernel-cache-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("k.json").path
        let previous = ProcessInfo.processInfo.environment["MOE_KERNEL_CACHE"]
        setenv("MOE_KERNEL_CACHE", file, 1)
        defer { if let previous { setenv("MOE_KERNEL_CACHE", previous, 1) } else { unsetenv("MOE_KERNEL_CACHE") } }
        let shapes = ProductShapes(shapes: [SIMD3(64, 32, 32)]), communicator = SingleRankCommunicator()
        _ = try KernelMeasurement.agreed(shapes: shapes, communicator: communicator)
        let cache = KernelCache()
        let key = try XCTUnwrap(cache.entries().keys.first)
        XCTAssertNil(cache.read(key)?.headProductsOneDNN)
        cache.write(key, KernelMeasurement(openBLASFP32: 1, oneDNNFP32: 2, oneDNNBF16: nil))
        var timings = 0
        let heads: (OneDNNMatmul?) -> Double = { matmul in
            timings += 1
            return matmul == nil ? 0.003 : 0.002
        }
        let completed = try KernelMeasurement.agreed(shapes: shapes, communicator: communicator, headProducts: heads)
        XCTAssertEqual(timings, 2, "each engine's head products timed once")
        XCTAssertEqual([completed.openBLASFP32, completed.oneDNNFP32], [1, 2], "the cached figures stay")
        XCTAssertEqual(completed.headProductsOpenBLAS ?? 0, 3, accuracy: 1e-9)
        XCTAssertEqual(completed.headProductsOneDNN ?? 0, 2, accuracy: 1e-9)
        XCTAssertTrue(completed.source.hasSuffix("head products measured"), completed.source)
        let again = try KernelMeasurement.agreed(shapes: shapes, communicator: communicator, headProducts: heads)
        XCTAssertEqual(timings, 2, "read from the cache")
        XCTAssertEqual([again.openBLASFP32, again.oneDNNFP32, again.headProductsOneDNN ?? 0], [1, 2, 2])
        XCTAssertTrue(again.source.hasPrefix("cached in") && !again.source.contains("measured"), again.source)
    }

    /// OpenBLAS on a generic core is named loudly, with the core the CPU's features allow; not
    /// when the user chose the core, nor on a CPU without AVX2.
    func testGenericOpenBLASCoreIsNamedWithTheSuitedCore() throws {
        let zen4: Set<Substring> = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"]
        let warning = try XCTUnwrap(BLASInfo.genericCoreWarning(core: "Prescott", cpuFlags: zen4, coreTypeSet: false))
        XCTAssertTrue(warning.contains("generic Prescott kernels") && warning.contains("OPENBLAS_CORETYPE=Cooperlake"), warning)
        XCTAssertEqual(BLASInfo.suitedCore(flags: ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]), "SkylakeX")
        XCTAssertEqual(BLASInfo.suitedCore(flags: ["avx2", "fma"]), "Haswell")
        XCTAssertNil(BLASInfo.genericCoreWarning(core: "Prescott", cpuFlags: zen4, coreTypeSet: true))
        XCTAssertNil(BLASInfo.genericCoreWarning(core: "Cooperlake", cpuFlags: zen4, coreTypeSet: false))
        XCTAssertNil(BLASInfo.genericCoreWarning(core: "Prescott", cpuFlags: ["sse3"], coreTypeSet: false))
    }
}
