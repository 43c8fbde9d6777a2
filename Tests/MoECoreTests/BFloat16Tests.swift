import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// bf16 mode against its fp32 twin. The bounds come from bf16's 8 significant bits:
/// rounding a value costs at most u = 2^-8 of it, so a product of two rounded inputs is off by
/// at most (2u + u²)|a||b|, and a dot product of K such terms (accumulated in fp32 by both
/// paths, whose own error is below K 2^-24 of Σ|a||b|) by at most (2u + u² + 2K 2^-24) Σ|a_i||b_i|.
/// That element-wise bound is rigorous for one product; chains of products (attention, the
/// model) are compared in the root-mean-square sense, where independent rounding errors add
/// in quadrature: each product contributes at most 2u of the RMS of its output.
final class BFloat16Tests: XCTestCase {
    let u = Double(BFloat16.unitRoundoff)

    override func setUpWithError() throws {
        try XCTSkipUnless(BFloat16Support.current.supported, "this CPU has no bf16 products (oneDNN: \(BFloat16Support.current.isa))")
        BLASInfo.setThreads(1)
    }

    func testRoundingIsToNearestEvenAndKeepsSpecialValues() {
        XCTAssertEqual(BFloat16(1).bitPattern, 0x3F80)
        XCTAssertEqual(BFloat16(1 + 0x1p-8).bitPattern, 0x3F80, "a tie rounds to the even neighbour 1")
        XCTAssertEqual(BFloat16(1 + 3 * 0x1p-8).bitPattern, 0x3F82, "a tie rounds to the even neighbour 1 + 2^-6")
        XCTAssertEqual(BFloat16(1 + 0x1p-8 + 0x1p-20).bitPattern, 0x3F81, "above the tie rounds up")
        XCTAssertEqual(BFloat16(-0.0).bitPattern, 0x8000)
        XCTAssertEqual(BFloat16(.infinity).bitPattern, 0x7F80)
        XCTAssertEqual(BFloat16(.greatestFiniteMagnitude).float, .infinity, "beyond bf16's largest rounds to infinity")
        XCTAssertTrue(BFloat16(.nan).float.isNaN)
        XCTAssertTrue(BFloat16(Float(bitPattern: 0x7F80_0001)).float.isNaN, "a NaN whose payload is in the low bits stays NaN")
        // The vector path agrees with the scalar rule, tails included.
        let count = 1000
        let key = RandomKey(3)
        var values = (0..<count).map { Float(key.normal($0) * pow(2, Double($0 % 40) - 20)) }
        values[5] = .nan; values[17] = -.infinity; values[18] = Float(bitPattern: 0x7FC0_0001); values[999] = 3.0e38
        var rounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        BFloat16.round(values, into: &rounded, count: count)
        for index in 0..<count where !(values[index].isNaN && rounded[index].float.isNaN) {
            XCTAssertEqual(rounded[index].bitPattern, BFloat16(values[index]).bitPattern, "value \(values[index]) at \(index)")
            if values[index].isFinite, abs(values[index]) < 1e38 {
                XCTAssertLessThanOrEqual(abs(Double(rounded[index].float) - Double(values[index])), u * Double(abs(values[index])))
            }
        }
    }

    /// Element-wise: |bf16 - fp32| <= (2u + u² + 2K 2^-24) (|A||B|)_ij for each of the three products.
    func testLinearMatchesItsFP32TwinWithinTheRoundingBound() throws {
        let rows = 37, input = 64, output = 48
        let store = ParameterStore<Float, Replicated>()
        let linear = Linear(store: store, path: ParameterPath("linear", role: .feedForward), inputSize: input, outputSize: output, deviation: 0.3)
        store.initialize(key: RandomKey(11))
        let x = floatTensor(rows: rows, columns: input, seed: 12), dy = floatTensor(rows: rows, columns: output, seed: 13)
        func products() -> (y: [Float], dW: [Float], dx: [Float]) {
            let y = Tensor<Float>(rows: rows, columns: output), dx = Tensor<Float>(rows: rows, columns: input)
            store.zeroGradients()
            linear.forward(x.pointer, rows: rows, into: y.pointer)
            linear.backward(x.pointer, dy.pointer, rows: rows, dx: dx.pointer)
            return (y.array, Array(UnsafeBufferPointer(start: linear.weight.gradient, count: input * output)), dx.array)
        }
        let reference = products()
        store.runProducts(on: try OneDNNMatmul(precision: .bf16))
        let rounded = products()
        let w = Tensor<Float>(rows: input, columns: output, values: Array(UnsafeBufferPointer(start: linear.weight.value, count: input * output)))
        // Magnitudes |A||B| of each product, in fp32 (exact enough for a bound with margin 2K 2^-24).
        let magnitudeY = absoluteProduct(x, w, transposeA: false, transposeB: false)
        let magnitudeW = absoluteProduct(x, dy, transposeA: true, transposeB: false)
        let magnitudeX = absoluteProduct(dy, w, transposeA: false, transposeB: true)
        for (label, expected, actual, magnitude, k) in [("y = xW", reference.y, rounded.y, magnitudeY, input),
                                                        ("dW = xᵀdy", reference.dW, rounded.dW, magnitudeW, rows),
                                                        ("dx = dy Wᵀ", reference.dx, rounded.dx, magnitudeX, output)] {
            let factor = 2 * u + u * u + 2 * Double(k) * 0x1p-24
            var worst = 0.0, largest = 0.0
            for index in expected.indices {
                let error = abs(Double(actual[index]) - Double(expected[index]))
                worst = max(worst, error / (factor * Double(magnitude[index]) + 1e-30))
                largest = max(largest, error)
            }
            XCTAssertLessThanOrEqual(worst, 1, "\(label): error exceeds the bf16 rounding bound (worst ratio \(worst))")
            XCTAssertGreaterThan(largest, 0, "\(label): identical to fp32, so the bf16 path did not run")
        }
    }

    /// In bf16 mode the FFN's fused passes skip the fp32 activation and dPre, which products of
    /// more than one row never read; a one-row product (an expert given one token, decoding)
    /// multiplies the fp32 values on OpenBLAS, so there they are written: its y and dx equal the
    /// fp32 twin's bit for bit, for the GELU and the SwiGLU FFN, with the hidden storage filled
    /// with NaN first so that a skipped write shows. With three rows the pass stays on bf16.
    func testOneRowFeedForwardReadsTheFloatValuesItWrites() throws {
        for architecture in [Architecture.gpt2, .llama] {
            let width = 16, hiddenSize = 24
            let store = ParameterStore<Float, ExpertSharded>()
            let ffn = FeedForward(store: store, path: ParameterPath("ffn", role: .feedForward), width: width, hiddenSize: hiddenSize,
                                  residualDeviation: 0.5, architecture: architecture)
            store.initialize(key: RandomKey(31))
            let x = floatTensor(rows: 3, columns: width, seed: 32), dy = floatTensor(rows: 3, columns: width, seed: 33)
            func run(rows: Int, rounded: Bool) -> (y: [Float], dx: [Float]) {
                let y = Tensor<Float>(rows: rows, columns: width), dx = Tensor<Float>(rows: rows, columns: width)
                let hidden = FeedForwardStorage<Float>(), scratch = Tensor<Float>(rows: rows, columns: ffn.scratchColumns)
                hidden.resize(rows: rows, for: ffn, rounded: rounded)
                for tensor in [hidden.preActivation, hidden.activation, scratch] {
                    tensor.pointer.update(repeating: .nan, count: tensor.count)
                }
                store.zeroGradients()
                ffn.forward(x.pointer, rows: rows, into: y.pointer, hidden: hidden.hidden())
                ffn.backward(x.pointer, dy.pointer, rows: rows, dx: dx.pointer, hidden: hidden.hidden(), scratch: scratch.pointer)
                return (y.array, dx.array)
            }
            let reference = run(rows: 1, rounded: false), referenceThree = run(rows: 3, rounded: false)
            store.runProducts(on: try OneDNNMatmul(precision: .bf16))
            let oneRow = run(rows: 1, rounded: true), threeRows = run(rows: 3, rounded: true)
            XCTAssertEqual(oneRow.y, reference.y, "\(architecture): one row's y")
            XCTAssertEqual(oneRow.dx, reference.dx, "\(architecture): one row's dx")
            for (label, expected, actual) in [("y", referenceThree.y, threeRows.y), ("dx", referenceThree.dx, threeRows.dx)] {
                let relative = rmsDifference(expected, actual) / rms(expected)
                XCTAssertLessThanOrEqual(relative, 16 * u, "\(architecture), three rows' \(label): RMS error \(relative) beyond 16u")
                XCTAssertGreaterThan(relative, 0, "\(architecture), three rows' \(label): identical to fp32, so the bf16 path did not run")
            }
        }
    }

    /// An MoE layer in bf16 mode fans out only the bf16 copy of an expert's rows, but for an
    /// expert given one row, whose products multiply the fp32 values: with top-1, a token routed
    /// to such an expert gets its fp32 twin's output bit for bit, even with the layer's fp32
    /// expert rows filled with NaN before the pass (a skipped row would show); the other tokens
    /// stay within bf16's error and are not identical (the bf16 path ran).
    func testMoEFanOutKeepsTheFloatRowsOfAOneRowExpert() throws {
        let experts = 8, tokens = 12, width = 16, hiddenSize = 24
        let replicated = ParameterStore<Float, Replicated>(), expertStore = ParameterStore<Float, ExpertSharded>()
        let router = replicated.add(ParameterPath("router", role: .router), rows: width, columns: experts, weightDecay: false,
                                    initialization: .normal(standardDeviation: 1))
        let policy = TopKPolicy<Float>(expertCount: experts, k: 1, renormalization: .beforeDrop, capacityFactor: nil,
                                       evalCapacityFactor: nil, minimumCapacity: 0, scoring: TopKPolicy<Float>.Scoring())
        let gate = Gate(kind: .topk, expertCount: experts, router: LinearRouter(weight: router), policy: policy)
        let communicator = SingleRankCommunicator()
        let placement = try ExpertPlacement(expertCount: experts, rankCount: 1, rank: 0)
        let ffns = placement.localExperts.map {
            FeedForward(store: expertStore, path: ParameterPath("experts.\($0)", role: .expert), width: width, hiddenSize: hiddenSize,
                        residualDeviation: 0.5)
        }
        let layer = MoELayer(gate: gate, experts: ffns, placement: placement, communicator: communicator)
        replicated.initialize(key: RandomKey(41))
        expertStore.initialize(key: RandomKey(42))
        let x = floatTensor(rows: tokens, columns: width, seed: 43)
        func forward() throws -> [Float] {
            let y = Tensor<Float>(rows: tokens, columns: width)
            let context = RoutingContext(training: true, communicator: communicator, globalTokens: tokens, firstGlobalToken: 0,
                                         tokenIds: nil, noiseKey: RandomKey(5))
            try layer.forward(x.pointer, rows: tokens, into: y.pointer, context: context)
            return y.array
        }
        let reference = try forward()
        let expertOf = (0..<layer.routing.count).reduce(into: [Int: Int]()) { $0[Int(layer.routing.tokens[$1])] = Int(layer.routing.experts[$1]) }
        let rowsOf = expertOf.values.reduce(into: [Int: Int]()) { $0[$1, default: 0] += 1 }
        let lone = Set(rowsOf.filter { $0.value == 1 }.keys), shared = Set(rowsOf.filter { $0.value > 1 }.keys)
        XCTAssertFalse(lone.isEmpty, "no expert got exactly one row: pick another seed")
        XCTAssertFalse(shared.isEmpty, "no expert got several rows: pick another seed")
        expertStore.runProducts(on: try OneDNNMatmul(precision: .bf16))
        _ = try forward()
        layer.expertInput.pointer.update(repeating: .nan, count: layer.expertInput.count)
        let rounded = try forward()
        for token in 0..<tokens {
            let expected = Array(reference[(token * width)..<((token + 1) * width)]), actual = Array(rounded[(token * width)..<((token + 1) * width)])
            if lone.contains(expertOf[token]!) {
                XCTAssertEqual(actual, expected, "token \(token), its expert's only row: the fp32 products")
            } else {
                let relative = rmsDifference(expected, actual) / rms(expected)
                XCTAssertLessThanOrEqual(relative, 16 * u, "token \(token): RMS error \(relative) beyond 16u")
                XCTAssertGreaterThan(relative, 0, "token \(token): identical to fp32, so the bf16 path did not run")
            }
        }
    }

    /// Attention chains five products with a softmax between: forward output and dx within 16u
    /// in RMS (five products at 2u each add in quadrature to about 4.5u; a factor of 3.5 of margin),
    /// and not identical to fp32.
    func testAttentionMatchesItsFP32TwinInRMS() throws {
        let batch = 3, length = 10, width = 32, heads = 4, rows = batch * length
        let store = ParameterStore<Float, Replicated>()
        let attention = CausalSelfAttention(store: store, path: ParameterPath("attention", role: .attention), width: width, heads: heads, residualDeviation: 0.1)
        store.initialize(key: RandomKey(21))
        // Larger QKV weights than at initialisation, so attention is peaked and the score path's
        // gradients (dQ, dK) are as large as the value path's instead of vanishing beside it.
        for index in 0..<attention.qkv.weight.count { attention.qkv.weight.value[index] *= 15 }
        let x = floatTensor(rows: rows, columns: width, seed: 22), dy = floatTensor(rows: rows, columns: width, seed: 23)
        func run() -> (y: [Float], dx: [Float], dQKV: [Float]) {
            let y = Tensor<Float>(rows: rows, columns: width), dx = Tensor<Float>(rows: rows, columns: width)
            let cache = CausalSelfAttention<Float>.Cache()
            store.zeroGradients()
            attention.forward(x.pointer, batch: batch, length: length, into: y.pointer, cache: cache)
            attention.backward(x.pointer, dy.pointer, batch: batch, length: length, dx: dx.pointer, cache: cache)
            return (y.array, dx.array, Array(UnsafeBufferPointer(start: attention.qkv.weight.gradient, count: width * 3 * width)))
        }
        let reference = run()
        store.runProducts(on: try OneDNNMatmul(precision: .bf16))
        let rounded = run()
        // The weight gradient's q, k and v column blocks separately: each comes from another product.
        func block(_ gradient: [Float], _ part: Int) -> [Float] {
            var columns: [Float] = []
            for row in 0..<width {
                let start = row * 3 * width + part * width
                columns += gradient[start..<(start + width)]
            }
            return columns
        }
        var comparisons: [(String, [Float], [Float])] = [("output", reference.y, rounded.y), ("dx", reference.dx, rounded.dx)]
        for (part, name) in ["dWq", "dWk", "dWv"].enumerated() {
            comparisons.append((name, block(reference.dQKV, part), block(rounded.dQKV, part)))
        }
        for (label, expected, actual) in comparisons {
            let relative = rmsDifference(expected, actual) / rms(expected)
            XCTAssertLessThanOrEqual(relative, 16 * u, "\(label): RMS error \(relative) beyond 16u")
            XCTAssertGreaterThan(relative, 0, "\(label): identical to fp32, so the bf16 path did not run")
        }
    }

    /// The whole model on one batch: the loss within 16u relative (cross-entropy averages many
    /// token losses, so rounding errors mostly cancel), every parameter's gradient within 16u in RMS.
    func testModelLossAndGradientMatchFP32() throws {
        var run = RunConfig()
        run.model.context = 16; run.model.width = 32; run.model.layers = 2; run.model.heads = 2; run.model.ffnHidden = 64
        run.moe.experts = 4; run.moe.topK = 2; run.moe.gate = .topk; run.moe.capacityFactor = 4
        run.evomoe.spawnFraction = 0
        let tokens: [Int32] = (0..<64).map { (index: Int) -> Int32 in Int32((index * 37 + index / 3) % 256) }
        let targets: [Int32] = tokens.map { ($0 + 1) % 256 }
        func lossAndGradient(_ precision: String) throws -> (Double, [String: [Float]]) {
            run.train.precision = PrecisionSetting(rawValue: precision)!
            let model = try GPTModel<Float>(run, vocabularySize: 256, communicator: SingleRankCommunicator())
            XCTAssertEqual(model.precision.rawValue, precision)
            model.initializeParameters(seed: 5)
            model.zeroGradients()
            let result = try model.forward(tokens: tokens, targets: targets, batch: 4, length: 16, training: true, globalTokens: 64,
                                           firstGlobalToken: 0, noiseKey: RandomKey(1))
            try model.backward(globalTokens: 64)
            var gradients: [String: [Float]] = [:]
            for entry in model.replicated.entries {
                gradients[entry.name] = Array(UnsafeBufferPointer(start: model.replicated.gradients + entry.offset, count: entry.count))
            }
            for entry in model.experts.entries {
                gradients[entry.name] = Array(UnsafeBufferPointer(start: model.experts.gradients + entry.offset, count: entry.count))
            }
            return (result.localLoss, gradients)
        }
        let (loss32, gradient32) = try lossAndGradient("fp32")
        let (loss16, gradient16) = try lossAndGradient("bf16")
        XCTAssertEqual(loss16, loss32, accuracy: 16 * u * loss32)
        XCTAssertNotEqual(loss16, loss32)
        // Tensor by tensor, so a dropped or wrong term in one parameter's gradient cannot hide in
        // the RMS of all of them. Tensors whose gradient is analytically zero (the key bias:
        // softmax ignores a shift shared by all keys) hold rounding noise only and are skipped.
        for (name, expected) in gradient32.sorted(by: { $0.key < $1.key }) where rms(expected) > 1e-7 {
            let relative = rmsDifference(expected, gradient16[name]!) / rms(expected)
            print(String(format: "%@ %.5f", name, relative))
            XCTAssertLessThanOrEqual(relative, 16 * u, "\(name): RMS error \(relative) of the bf16 gradient")
        }
    }

    func testExplicitBF16OnACPUWithoutItNamesTheMissingFeature() {
        let without = BFloat16Support(isa: "avx512_core", supported: false)
        let measured = KernelMeasurement(openBLASFP32: 100, oneDNNFP32: 100, oneDNNBF16: nil)
        XCTAssertThrowsError(try KernelChoice.decide(precision: .bf16, kernel: .auto, measurement: measured, support: without)) { error in
            XCTAssertTrue("\(error)".contains("AVX512-BF16") && "\(error)".contains("avx512_core"), "\(error)")
        }
        let auto = try! KernelChoice.decide(precision: .auto, kernel: .auto, measurement: measured, support: without)
        XCTAssertEqual(auto.precision, .fp32)
        XCTAssertTrue(auto.summary.contains("no bf16 products on this CPU"), auto.summary)
        // Figures for bf16 (a stale cache, say) do not make a CPU without it train in bf16.
        let stale = KernelMeasurement(openBLASFP32: 100, oneDNNFP32: 100, oneDNNBF16: 400)
        XCTAssertEqual(try! KernelChoice.decide(precision: .auto, kernel: .auto, measurement: stale, support: without).precision, .fp32)
    }

    /// ZeRO stage 1's sharded masters: `keepValues` leaves the kept ranges and the whole bf16
    /// copy as they were and returns the pages wholly outside them to the OS (not resident per
    /// mincore, read as zero); after all values are written again (a checkpoint load),
    /// `didWriteAllValues` rounds the new values and releases the same pages again.
    func testKeepingPartOfTheMasterValuesReleasesTheRest() throws {
        let store = ParameterStore<Float, Replicated>()
        _ = store.add(ParameterPath("norm", role: .routingTable), rows: 1, columns: 100, weightDecay: false, initialization: .ones)
        _ = store.add(ParameterPath("weight", role: .routingTable), rows: 1024, columns: 1024, weightDecay: true, initialization: .normal(standardDeviation: 0.02),
                      productOnly: true)   // 4 MiB
        store.runProducts(on: try OneDNNMatmul(precision: .bf16))
        store.initialize(key: RandomKey(3))
        store.refreshBFloat16()
        let slice = 300_000..<600_000, kept = [0..<100, slice]
        func assertKeeps(_ expected: [Float], _ label: String) {
            // The gaps: whole pages between 100 + a page and 300 000, and after 600 000 + a page
            // (before anything reads them: a read maps the zero page).
            let pageSize = Int(sysconf(Int32(_SC_PAGESIZE))), base = Int(bitPattern: UnsafeRawPointer(store.values))
            var gaps: [Range<Int>] = []
            for gap in [(100 * 4 + pageSize)..<(slice.lowerBound * 4 - pageSize), (slice.upperBound * 4 + pageSize)..<(store.count * 4 - pageSize)] {
                let start = (base + gap.lowerBound) / pageSize * pageSize + pageSize, pages = (gap.count - pageSize) / pageSize
                var residency = [UInt8](repeating: 1, count: pages)
                XCTAssertEqual(mincore(UnsafeMutableRawPointer(bitPattern: start), pages * pageSize, &residency), 0)
                XCTAssertEqual(residency.filter { $0 & 1 != 0 }.count, 0, "\(label): resident pages in \(gap) (\(pages) pages)")
                gaps.append((start - base) / 4..<(start - base) / 4 + pages * pageSize / 4)
            }
            let values = Array(UnsafeBufferPointer(start: store.values, count: store.count))
            for gap in gaps { XCTAssertTrue(values[gap].allSatisfy { $0 == 0 }, "\(label): released values read as zero") }
            let copy = Array(UnsafeBufferPointer(start: store.bfloat16Values!, count: store.count))
            XCTAssertEqual(copy, expected.map(BFloat16.init), "\(label): the bf16 copy is whole")
            for range in kept { XCTAssertEqual(values[range], expected[range], "\(label): kept \(range)") }
        }
        let initial = Array(UnsafeBufferPointer(start: store.values, count: store.count))
        try store.keepValues(only: kept)
        assertKeeps(initial, "after keepValues")
        // A load writes every value, which makes the pages resident again.
        let loaded = initial.map { $0 * 2 }
        store.values.update(from: loaded, count: store.count)
        store.didWriteAllValues()
        assertKeeps(loaded, "after a load")
    }

    // MARK: helpers

    func floatTensor(rows: Int, columns: Int, seed: Int) -> Tensor<Float> {
        let key = RandomKey(UInt64(seed))
        return Tensor(rows: rows, columns: columns, values: (0..<rows * columns).map { Float(key.normal($0)) })
    }

    /// |op(A)| |op(B)| in fp32.
    func absoluteProduct(_ a: Tensor<Float>, _ b: Tensor<Float>, transposeA: Bool, transposeB: Bool) -> [Float] {
        let absA = Tensor(rows: a.rows, columns: a.columns, values: a.array.map(abs))
        let absB = Tensor(rows: b.rows, columns: b.columns, values: b.array.map(abs))
        let m = transposeA ? a.columns : a.rows, k = transposeA ? a.rows : a.columns, n = transposeB ? b.rows : b.columns
        let c = Tensor<Float>(rows: m, columns: n)
        gemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, a: absA.pointer, b: absB.pointer, c: c.pointer)
        return c.array
    }

    func rms(_ values: [Float]) -> Double {
        (values.reduce(0) { $0 + Double($1) * Double($1) } / Double(values.count)).squareRoot()
    }

    func rmsDifference(_ a: [Float], _ b: [Float]) -> Double {
        (zip(a, b).reduce(0) { $0 + (Double($1.0) - Double($1.1)) * (Double($1.0) - Double($1.1)) } / Double(a.count)).squareRoot()
    }
}
