import XCTest
@testable import MoECore
import MoEComm
import MoEIO

final class LayerGradientTests: XCTestCase {
    let checker = GradientChecker()

    func testLinear() {
        let store = ParameterStore<Double, Replicated>()
        let linear = Linear(store: store, path: ParameterPath("linear", role: .feedForward), inputSize: 5, outputSize: 3, deviation: 0.5)
        store.initialize(key: RandomKey(1))
        for i in 0..<3 { linear.bias!.value[i] = Double(i) * 0.1 }
        let x = randomTensor(rows: 4, columns: 5, seed: 2), projection = randomTensor(rows: 4, columns: 3, seed: 3)
        let y = Tensor<Double>(rows: 4, columns: 3), dx = Tensor<Double>(rows: 4, columns: 5)
        func loss() -> Double { linear.forward(x.pointer, rows: 4, into: y.pointer); return projectedLoss(y, projection) }
        _ = loss()
        linear.backward(x.pointer, projection.pointer, rows: 4, dx: dx.pointer)
        checker.check("weight", values: linear.weight.value, gradients: linear.weight.gradient, count: 15, loss: loss)
        checker.check("bias", values: linear.bias!.value, gradients: linear.bias!.gradient, count: 3, loss: loss)
        checker.check("x", values: x.pointer, gradients: dx.pointer, count: 20, loss: loss)
    }

    func testEmbedding() {
        let store = ParameterStore<Double, Replicated>()
        let embedding = Embedding(store: store, vocabularySize: 7, context: 4, width: 3, decay: false)
        store.initialize(key: RandomKey(4))
        let tokens: [Int32] = [1, 5, 5, 0, 6, 1, 2, 3]
        let projection = randomTensor(rows: 8, columns: 3, seed: 5)
        let y = Tensor<Double>(rows: 8, columns: 3)
        func loss() -> Double {
            tokens.withUnsafeBufferPointer { embedding.forward(tokens: $0.baseAddress!, batch: 2, length: 4, into: y.pointer) }
            return projectedLoss(y, projection)
        }
        _ = loss()
        tokens.withUnsafeBufferPointer { embedding.backward(tokens: $0.baseAddress!, batch: 2, length: 4, dOut: projection.pointer) }
        checker.check("token", values: embedding.tokenTable.value, gradients: embedding.tokenTable.gradient, count: 21, loss: loss)
        checker.check("position", values: embedding.positionTable!.value, gradients: embedding.positionTable!.gradient, count: 12, loss: loss)
    }

    func testLayerNorm() {
        let store = ParameterStore<Double, Replicated>()
        let norm = LayerNorm(store: store, path: ParameterPath("norm", role: .norm), width: 6, decay: false)
        for i in 0..<6 { norm.gain.value[i] = 1 + 0.1 * Double(i); norm.bias.value[i] = 0.05 * Double(i) }
        let x = randomTensor(rows: 3, columns: 6, seed: 6, scale: 2), projection = randomTensor(rows: 3, columns: 6, seed: 7)
        let y = Tensor<Double>(rows: 3, columns: 6), dx = Tensor<Double>(rows: 3, columns: 6)
        let cache = LayerNorm<Double>.Cache()
        func loss() -> Double { norm.forward(x.pointer, rows: 3, into: y.pointer, cache: cache); return projectedLoss(y, projection) }
        _ = loss()
        norm.backward(x.pointer, projection.pointer, rows: 3, dx: dx.pointer, cache: cache)
        checker.check("gain", values: norm.gain.value, gradients: norm.gain.gradient, count: 6, loss: loss)
        checker.check("bias", values: norm.bias.value, gradients: norm.bias.gradient, count: 6, loss: loss)
        checker.check("x", values: x.pointer, gradients: dx.pointer, count: 18, loss: loss)
    }

    /// Float's vectorised layer norm (row sums in 16 lanes) against the Double reference, forward
    /// and backward; width 37 exercises two vector blocks and a tail.
    func testLayerNormFloatPathMatchesTheDoubleReference() {
        let rows = 4, width = 37
        let doubleStore = ParameterStore<Double, Replicated>(), floatStore = ParameterStore<Float, Replicated>()
        let doubleNorm = LayerNorm(store: doubleStore, path: ParameterPath("norm", role: .norm), width: width, decay: false)
        let floatNorm = LayerNorm(store: floatStore, path: ParameterPath("norm", role: .norm), width: width, decay: false)
        for i in 0..<width {
            doubleNorm.gain.value[i] = 1 + 0.03 * Double(i); doubleNorm.bias.value[i] = 0.02 * Double(i) - 0.3
            floatNorm.gain.value[i] = Float(doubleNorm.gain.value[i]); floatNorm.bias.value[i] = Float(doubleNorm.bias.value[i])
        }
        let x = randomTensor(rows: rows, columns: width, seed: 8, scale: 2), dy = randomTensor(rows: rows, columns: width, seed: 9)
        let floatX = Tensor<Float>(rows: rows, columns: width, values: x.array.map(Float.init))
        let floatDy = Tensor<Float>(rows: rows, columns: width, values: dy.array.map(Float.init))
        let y = Tensor<Double>(rows: rows, columns: width), floatY = Tensor<Float>(rows: rows, columns: width)
        let dx = Tensor<Double>(rows: rows, columns: width), floatDx = Tensor<Float>(rows: rows, columns: width)
        let cache = LayerNorm<Double>.Cache(), floatCache = LayerNorm<Float>.Cache()
        doubleNorm.forward(x.pointer, rows: rows, into: y.pointer, cache: cache)
        floatNorm.forward(floatX.pointer, rows: rows, into: floatY.pointer, cache: floatCache)
        doubleNorm.backward(x.pointer, dy.pointer, rows: rows, dx: dx.pointer, cache: cache)
        floatNorm.backward(floatX.pointer, floatDy.pointer, rows: rows, dx: floatDx.pointer, cache: floatCache)
        func close(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Double>, _ count: Int, _ what: String) {
            for i in 0..<count { XCTAssertEqual(Double(a[i]), b[i], accuracy: 2e-5 * max(1, abs(b[i])), "\(what)[\(i)]") }
        }
        close(floatY.pointer, y.pointer, rows * width, "y")
        close(floatDx.pointer, dx.pointer, rows * width, "dx")
        close(floatNorm.gain.gradient, doubleNorm.gain.gradient, width, "dgain")
        close(floatNorm.bias.gradient, doubleNorm.bias.gradient, width, "dbias")
    }

    /// A norm of a residual sum, block by block (`forward(sumOf:_:writingSumTo:...)`), writes bit
    /// for bit the sum pass and then the norm: the sum, the output and the cache, for both norms
    /// and both precisions. 77 rows of 40 (8 KB blocks of 51 rows: a whole block and a part).
    func testNormOfAResidualSumEqualsTheSumThenTheNorm() {
        func check<T: Scalar>(_: T.Type, rms: Bool) {
            let rows = 77, width = 40, store = ParameterStore<T, Replicated>()
            let path = ParameterPath("norm", role: .norm)
            let norm: Normalization<T> = rms ? .rms(RMSNorm(store: store, path: path, width: width, epsilon: 1e-5, decay: false))
                : .layer(LayerNorm(store: store, path: path, width: width, decay: false))
            store.initialize(key: RandomKey(3))
            for i in 0..<store.count { store.values[i] = T(1 + 0.01 * Double(i % 17)) }
            let a = Tensor<T>(rows: rows, columns: width, values: randomTensor(rows: rows, columns: width, seed: 10, scale: 2).array.map { T($0) })
            let b = Tensor<T>(rows: rows, columns: width, values: randomTensor(rows: rows, columns: width, seed: 11).array.map { T($0) })
            let sum = Tensor<T>(rows: rows, columns: width), y = Tensor<T>(rows: rows, columns: width), cache = NormCache<T>()
            let expectedSum = Tensor<T>(rows: rows, columns: width), expectedY = Tensor<T>(rows: rows, columns: width)
            let expectedCache = NormCache<T>()
            Kernels.sum(a.pointer, b.pointer, into: expectedSum.pointer, count: rows * width)
            norm.forward(expectedSum.pointer, rows: rows, into: expectedY.pointer, cache: expectedCache)
            norm.forward(sumOf: a.pointer, b.pointer, writingSumTo: sum.pointer, rows: rows, into: y.pointer, cache: cache)
            let label = "\(T.self), \(rms ? "RMSNorm" : "LayerNorm")"
            XCTAssertEqual(sum.array, expectedSum.array, "sum, \(label)")
            XCTAssertEqual(y.array, expectedY.array, "output, \(label)")
            XCTAssertEqual(cache.reciprocalDeviation.array, expectedCache.reciprocalDeviation.array, "reciprocals, \(label)")
            if !rms { XCTAssertEqual(cache.mean.array, expectedCache.mean.array, "means, \(label)") }
        }
        for rms in [false, true] {
            check(Float.self, rms: rms)
            check(Double.self, rms: rms)
        }
    }

    func testCausalSelfAttention() {
        let store = ParameterStore<Double, Replicated>()
        let attention = CausalSelfAttention(store: store, path: ParameterPath("attention", role: .attention), width: 8, heads: 2, residualDeviation: 0.3)
        store.initialize(key: RandomKey(8))
        for i in 0..<24 { attention.qkv.bias!.value[i] = 0.01 * Double(i) }
        checker.checkAttention(attention, store: store)
    }

    /// At 16 tokens the per-head products run over two query blocks, each against the keys it
    /// can see (`causalBlocks`): the gradients still match finite differences.
    func testCausalSelfAttentionOverQueryBlocks() {
        XCTAssertEqual(CausalSelfAttention<Double>.causalBlocks(length: 16), 2)
        let store = ParameterStore<Double, Replicated>()
        let attention = CausalSelfAttention(store: store, path: ParameterPath("attention", role: .attention), width: 8, heads: 2, residualDeviation: 0.3)
        store.initialize(key: RandomKey(8))
        for i in 0..<24 { attention.qkv.bias!.value[i] = 0.01 * Double(i) }
        checker.checkAttention(attention, store: store, length: 16)
    }

    /// The tiled path (T = 11 over tiles of 3: partial last tiles, diagonal tiles, rows whose
    /// running max changes across tiles) equals the full path's outputs, and its backward (which
    /// recomputes the probabilities) passes the finite-difference check.
    func testTiledAttentionMatchesTheFullPathAndItsGradient() {
        let store = ParameterStore<Double, Replicated>()
        let full = CausalSelfAttention(store: store, path: ParameterPath("attention", role: .attention), width: 8, heads: 2, residualDeviation: 0.3)
        store.initialize(key: RandomKey(8))
        for i in 0..<24 { full.qkv.bias!.value[i] = 0.01 * Double(i) }
        for i in 0..<store.count { store.values[i] *= 3 }   // sharper softmax rows
        // The same parameters in a second store, read by the tiled layer.
        let tiledStore = ParameterStore<Double, Replicated>()
        let tiled = CausalSelfAttention(store: tiledStore, path: ParameterPath("attention", role: .attention), width: 8, heads: 2, residualDeviation: 0.3, tile: 3)
        tiledStore.initialize(key: RandomKey(1))
        tiledStore.values.update(from: store.values, count: store.count)
        let (batch, length) = (2, 11), rows = 22
        let x = randomTensor(rows: rows, columns: 8, seed: 9), projection = randomTensor(rows: rows, columns: 8, seed: 10)
        let y = Tensor<Double>(rows: rows, columns: 8), reference = Tensor<Double>(rows: rows, columns: 8)
        let dx = Tensor<Double>(rows: rows, columns: 8), dReference = Tensor<Double>(rows: rows, columns: 8)
        let cache = CausalSelfAttention<Double>.Cache(), fullCache = CausalSelfAttention<Double>.Cache()
        full.forward(x.pointer, batch: batch, length: length, into: reference.pointer, cache: fullCache)
        tiled.forward(x.pointer, batch: batch, length: length, into: y.pointer, cache: cache)
        for index in 0..<y.count { XCTAssertEqual(y.pointer[index], reference.pointer[index], accuracy: 1e-12) }
        XCTAssertEqual(cache.probabilities.count, 0, "the tiled path stores no T x T probabilities")
        func loss() -> Double {
            tiled.forward(x.pointer, batch: batch, length: length, into: y.pointer, cache: cache)
            return projectedLoss(y, projection)
        }
        store.zeroGradients()
        full.backward(x.pointer, projection.pointer, batch: batch, length: length, dx: dReference.pointer, cache: fullCache)
        let fullGradients = Array(UnsafeBufferPointer(start: store.gradients, count: store.count))
        tiledStore.zeroGradients()
        _ = loss()
        tiled.backward(x.pointer, projection.pointer, batch: batch, length: length, dx: dx.pointer, cache: cache)
        for index in 0..<store.count { XCTAssertEqual(tiledStore.gradients[index], fullGradients[index], accuracy: 1e-11) }
        for index in 0..<dx.count { XCTAssertEqual(dx.pointer[index], dReference.pointer[index], accuracy: 1e-11) }
        for (name, parameter) in [("qkv.weight", tiled.qkv.weight), ("qkv.bias", tiled.qkv.bias!)] {
            checker.check(name, values: parameter.value, gradients: parameter.gradient, count: parameter.count, loss: loss)
        }
        checker.check("x", values: x.pointer, gradients: dx.pointer, count: x.count, loss: loss)
    }

    func testCausalityOfAttention() {
        // Changing a later token must not change earlier outputs.
        let store = ParameterStore<Double, Replicated>()
        let attention = CausalSelfAttention(store: store, path: ParameterPath("attention", role: .attention), width: 8, heads: 2, residualDeviation: 0.3)
        store.initialize(key: RandomKey(8))
        let x = randomTensor(rows: 5, columns: 8, seed: 11)
        let y1 = Tensor<Double>(rows: 5, columns: 8), y2 = Tensor<Double>(rows: 5, columns: 8)
        let cache = CausalSelfAttention<Double>.Cache()
        attention.forward(x.pointer, batch: 1, length: 5, into: y1.pointer, cache: cache)
        for c in 0..<8 { x[4, c] += 1 }
        attention.forward(x.pointer, batch: 1, length: 5, into: y2.pointer, cache: cache)
        XCTAssertEqual(Array(y1.array[0..<32]), Array(y2.array[0..<32]))
        XCTAssertNotEqual(Array(y1.array[32..<40]), Array(y2.array[32..<40]))
    }

    func testFeedForward() {
        let store = ParameterStore<Double, ExpertSharded>()
        let ffn = FeedForward(store: store, path: ParameterPath("ffn", role: .feedForward), width: 4, hiddenSize: 6, residualDeviation: 0.5)
        store.initialize(key: RandomKey(12))
        let x = randomTensor(rows: 3, columns: 4, seed: 13, scale: 3), projection = randomTensor(rows: 3, columns: 4, seed: 14)
        let y = Tensor<Double>(rows: 3, columns: 4), dx = Tensor<Double>(rows: 3, columns: 4)
        let hidden = FeedForwardStorage<Double>(), scratch = Tensor<Double>(rows: 3, columns: 6)
        hidden.resize(rows: 3, for: ffn, rounded: false)
        func loss() -> Double {
            ffn.forward(x.pointer, rows: 3, into: y.pointer, hidden: hidden.hidden())
            return projectedLoss(y, projection)
        }
        _ = loss()
        ffn.backward(x.pointer, projection.pointer, rows: 3, dx: dx.pointer, hidden: hidden.hidden(), scratch: scratch.pointer)
        for (name, parameter) in [("up.weight", ffn.up.weight), ("up.bias", ffn.up.bias!),
                                  ("down.weight", ffn.down.weight), ("down.bias", ffn.down.bias!)] {
            checker.check(name, values: parameter.value, gradients: parameter.gradient, count: parameter.count, loss: loss)
        }
        checker.check("x", values: x.pointer, gradients: dx.pointer, count: 12, loss: loss)
    }

    func testCrossEntropy() {
        let logits = randomTensor(rows: 4, columns: 9, seed: 15, scale: 2)
        let targets: [Int32] = [0, 8, 3, 3]
        let work = Tensor<Double>(rows: 4, columns: 9)
        func loss() -> Double {
            work.pointer.update(from: logits.pointer, count: 36)
            return targets.withUnsafeBufferPointer { CrossEntropy.forward(logits: work.pointer, targets: $0.baseAddress!, rows: 4, vocabularySize: 9) } / 4
        }
        _ = loss()
        targets.withUnsafeBufferPointer {
            CrossEntropy.backward(probabilities: work.pointer, targets: $0.baseAddress!, rows: 4, vocabularySize: 9, scale: 0.25)
        }
        let gradient = Tensor<Double>(rows: 4, columns: 9, values: work.array)
        checker.check("logits", values: logits.pointer, gradients: gradient.pointer, count: 36, loss: loss)
    }

    func testKernelsMatchLibm() {
        // The SIMD exp and GELU against Foundation's, in Float and Double.
        let inputs: [Double] = stride(from: -30.0, through: 30.0, by: 0.37).map { $0 }
        var floats = inputs.map(Float.init), doubles = inputs
        let floatOut = [Float](unsafeUninitializedCapacity: floats.count) { buffer, count in
            Kernels.geluForward(&floats, buffer.baseAddress!, count: floats.count); count = floats.count
        }
        let doubleOut = [Double](unsafeUninitializedCapacity: doubles.count) { buffer, count in
            Kernels.geluForward(&doubles, buffer.baseAddress!, count: doubles.count); count = doubles.count
        }
        for (index, x) in inputs.enumerated() {
            let reference = 0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
            XCTAssertEqual(doubleOut[index], reference, accuracy: 1e-13 * max(1, abs(reference)))
            XCTAssertEqual(Double(floatOut[index]), reference, accuracy: 2e-6 * max(1, abs(reference)))
        }
        for x in stride(from: -80.0, through: 80.0, by: 0.731) {
            let value = Float.exp(SIMD16(repeating: Float(x)))[0]
            XCTAssertEqual(Double(value), Foundation.exp(Double(Float(x))), accuracy: 3e-7 * Foundation.exp(Double(Float(x))))
            let doubleValue = Double.exp(SIMD16(repeating: x))[0]
            XCTAssertEqual(doubleValue, Foundation.exp(x), accuracy: 1e-14 * Foundation.exp(x))
        }
    }

    /// The Float fast paths (FloatKernels.swift) against the generic kernels run in Double, which
    /// the gradient checks cover. Odd counts exercise the vector tails.
    func testFloatFastPathsMatchTheDoubleReference() {
        let count = 16 * 7 + 5
        let key = RandomKey(42)
        let x = (0..<count).map { key.normal($0) * 3 }, dy = (0..<count).map { key.derive(1).normal($0) }
        var floatX = x.map(Float.init), floatDy = dy.map(Float.init)
        var doubleX = x, doubleDy = dy
        var floatOut = [Float](repeating: 0, count: count), doubleOut = [Double](repeating: 0, count: count)
        func close(_ a: [Float], _ b: [Double], _ tolerance: Double, _ what: String) {
            for index in 0..<count { XCTAssertEqual(Double(a[index]), b[index], accuracy: tolerance * max(1, abs(b[index])), "\(what)[\(index)]") }
        }
        Kernels.geluForward(&floatX, &floatOut, count: count)
        Kernels.geluForward(&doubleX, &doubleOut, count: count)
        close(floatOut, doubleOut, 3e-6, "gelu")
        Kernels.geluBackward(&floatX, &floatDy, &floatOut, count: count)
        Kernels.geluBackward(&doubleX, &doubleDy, &doubleOut, count: count)
        close(floatOut, doubleOut, 3e-6, "gelu backward")
        var floatRow = floatX, doubleRow = doubleX
        let floatLogSumExp = Kernels.softmaxRow(&floatRow, count: count)
        let doubleLogSumExp = Kernels.softmaxRow(&doubleRow, count: count)
        close(floatRow, doubleRow, 1e-6, "softmax")
        XCTAssertEqual(Double(floatLogSumExp), doubleLogSumExp, accuracy: 1e-5)
        var floatGradient = floatDy, doubleGradient = doubleDy
        Kernels.softmaxBackwardRow(probabilities: floatRow, &floatGradient, count: count)
        Kernels.softmaxBackwardRow(probabilities: doubleRow, &doubleGradient, count: count)
        close(floatGradient, doubleGradient, 1e-6, "softmax backward")
        XCTAssertEqual(Kernels.sumOfSquares(&floatX, count: count), Kernels.sumOfSquares(&doubleX, count: count),
                       accuracy: 1e-5 * Kernels.sumOfSquares(&doubleX, count: count))
        // AdamW: one update of each precision from the same state.
        var floatValues = floatDy, floatFirst = floatX.map { $0 * 0.01 }, floatSecond = floatX.map { $0 * $0 * 1e-3 }
        var doubleValues = doubleDy, doubleFirst = doubleX.map { $0 * 0.01 }, doubleSecond = doubleX.map { $0 * $0 * 1e-3 }
        var floatRounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        var (floatGradients, doubleGradients) = (floatX, doubleX)
        let (floatStart, firstStart, secondStart) = (floatValues, floatFirst, floatSecond)
        AdamW<Float, Replicated>.updateRange(values: &floatValues, rounded: &floatRounded, gradients: &floatGradients, first: &floatFirst, second: &floatSecond,
                                             count: count, beta1: 0.9, beta2: 0.95, stepSize: 1e-2, epsilon: 1e-8,
                                             decay: 0.999, gradientScale: 0.5)
        AdamW<Double, Replicated>.updateRange(values: &doubleValues, gradients: &doubleGradients, first: &doubleFirst, second: &doubleSecond,
                                              count: count, beta1: 0.9, beta2: 0.95, stepSize: 1e-2, epsilon: 1e-8,
                                              decay: 0.999, gradientScale: 0.5)
        close(floatValues, doubleValues, 1e-6, "adamw values")
        close(floatSecond, doubleSecond, 1e-6, "adamw second moment")
        // The bf16 copy written in the same pass (vector blocks and tail) is the values' rounding.
        XCTAssertEqual(floatRounded, floatValues.map(BFloat16.init), "adamw's fused bf16 copy")
        XCTAssertEqual(floatGradients, floatX, "without clearing the gradients are left alone")
        // Clearing as it reads: the same update bit for bit, and every gradient (blocks and tail) zero.
        var (clearedValues, clearedFirst, clearedSecond) = (floatStart, firstStart, secondStart)
        AdamW<Float, Replicated>.updateRange(values: &clearedValues, gradients: &floatGradients, first: &clearedFirst, second: &clearedSecond,
                                             count: count, beta1: 0.9, beta2: 0.95, stepSize: 1e-2, epsilon: 1e-8,
                                             decay: 0.999, gradientScale: 0.5, clearing: true)
        XCTAssertEqual(clearedValues, floatValues)
        XCTAssertEqual(clearedFirst, floatFirst)
        XCTAssertEqual(clearedSecond, floatSecond)
        XCTAssertEqual(floatGradients, [Float](repeating: 0, count: count), "adamw's clearing")
    }

    /// The causal softmax row kernels (Float, rows of whole 16-lane blocks) compute, bit for bit,
    /// what the row-by-row steps do: softmax (or its adjoint) of the visible values, zeros after
    /// them, the bf16 copy of the row. Every visible count of rows of 16, 48 and 128, with NaN
    /// past the visible values, which must not leak in.
    func testCausalSoftmaxRowsEqualTheRowByRowSteps() {
        let rounding = VectorRounding()
        for length in [16, 48, 128] {
            let key = RandomKey(UInt64(length))
            for visible in 1...length {
                let scores = (0..<length).map { $0 < visible ? Float(key.normal($0 + visible * length) * 3) : .nan }
                let dProbabilities = (0..<length).map { $0 < visible ? Float(key.derive(1).normal($0 + visible * length)) : .nan }
                // Row by row: the generic steps on the visible values, zeros, rounding.
                var expected = scores
                expected.withUnsafeMutableBufferPointer { Kernels.softmax(row: $0.baseAddress!, count: visible) }
                for j in visible..<length { expected[j] = 0 }
                var expectedD = dProbabilities
                expectedD.withUnsafeMutableBufferPointer { Kernels.softmaxBackwardRow(probabilities: expected, $0.baseAddress!, count: visible) }
                for j in visible..<length { expectedD[j] = 0 }
                // The row kernels.
                var row = scores, rounded = [BFloat16](repeating: BFloat16(bitPattern: 0x7FC0), count: length)
                FloatKernels.causalSoftmaxRow(&row, visible: visible, length: length, rounded: &rounded, rounding: rounding)
                var dRow = dProbabilities, dRounded = rounded
                FloatKernels.causalSoftmaxBackwardRow(probabilities: row, &dRow, visible: visible, length: length, rounded: &dRounded,
                                                      rounding: rounding)
                XCTAssertEqual(row.map(\.bitPattern), expected.map(\.bitPattern), "softmax, visible \(visible) of \(length)")
                XCTAssertEqual(rounded.map(\.bitPattern), expected.map { BFloat16($0).bitPattern }, "softmax's copy, visible \(visible)")
                XCTAssertEqual(dRow.map(\.bitPattern), expectedD.map(\.bitPattern), "adjoint, visible \(visible) of \(length)")
                XCTAssertEqual(dRounded.map(\.bitPattern), expectedD.map { BFloat16($0).bitPattern }, "adjoint's copy, visible \(visible)")
            }
        }
    }

    /// A router's narrow rows (fewer than 16 experts) as masked whole vectors compute, bit for
    /// bit, the row-by-row kernels: the softmax with its log-sum-exp, and the load-balancing
    /// loss's adjoint added into dLogits. 1-15 columns, 37 rows (the last rows take the path that
    /// stays in the buffer), logits up to ±12 so that some probabilities underflow.
    func testNarrowRouterRowsEqualTheRowByRowKernels() {
        let rows = 37
        for count in 1..<16 {
            let key = RandomKey(UInt64(100 + count))
            let logits = (0..<rows * count).map { Float(key.normal($0) * 4) }
            let shared = (0..<count).map { Float(key.derive(1).normal($0)) }
            let dStart = (0..<rows * count).map { Float(key.derive(2).normal($0)) }
            var expected = logits, expectedSums = [Float](repeating: 0, count: rows), expectedD = dStart
            for row in 0..<rows {
                expected.withUnsafeMutableBufferPointer { expectedSums[row] = Kernels.softmaxRow($0.baseAddress! + row * count, count: count) }
                var g = shared
                expected.withUnsafeBufferPointer { p in
                    g.withUnsafeMutableBufferPointer { Kernels.softmaxBackwardRow(probabilities: p.baseAddress! + row * count, $0.baseAddress!, count: count) }
                }
                expectedD.withUnsafeMutableBufferPointer { Kernels.add(g, into: $0.baseAddress! + row * count, count: count) }
            }
            var probabilities = [Float](repeating: .nan, count: rows * count), sums = [Float](repeating: .nan, count: rows)
            FloatKernels.narrowSoftmaxRows(logits, into: &probabilities, rows: rows, count: count, logSumExp: &sums)
            var d = dStart
            FloatKernels.narrowSoftmaxBackwardAdding(probabilities: probabilities, sharedGradient: shared, rows: rows, count: count, into: &d)
            XCTAssertEqual(probabilities.map(\.bitPattern), expected.map(\.bitPattern), "softmax, \(count) experts")
            XCTAssertEqual(sums.map(\.bitPattern), expectedSums.map(\.bitPattern), "log-sum-exp, \(count) experts")
            XCTAssertEqual(d.map(\.bitPattern), expectedD.map(\.bitPattern), "balance loss adjoint, \(count) experts")
        }
    }

    /// The FFN hidden layer's fused passes (Float) compute, bit for bit, what the unfused steps
    /// do: addBias, GELU and rounding forward; GELU', the bias column sums and rounding backward.
    /// 37 columns: two vector blocks and a tail per row.
    func testFusedFeedForwardPassesEqualTheUnfusedSteps() {
        let rows = 5, columns = 37, count = rows * columns
        let key = RandomKey(7)
        let pre = (0..<count).map { Float(key.normal($0) * 2) }, bias = (0..<columns).map { Float(key.derive(1).normal($0)) }
        let dActivation = (0..<count).map { Float(key.derive(2).normal($0)) }
        let gradientStart = (0..<columns).map { Float(key.derive(3).normal($0)) }
        // Unfused reference.
        var referencePre = pre, referenceActivation = [Float](repeating: 0, count: count)
        Kernels.addBias(bias, to: &referencePre, rows: rows, columns: columns)
        Kernels.geluForward(&referencePre, &referenceActivation, count: count)
        var referenceRounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        BFloat16.round(referenceActivation, into: &referenceRounded, count: count)
        var referenceD = [Float](repeating: 0, count: count), referenceBias = gradientStart
        Kernels.geluBackward(referencePre, dActivation, &referenceD, count: count)
        Kernels.addColumnSums(referenceD, rows: rows, columns: columns, into: &referenceBias)
        // Fused.
        var fusedPre = pre, fusedActivation = [Float](repeating: 0, count: count)
        var fusedRounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        FloatKernels.biasGELU(&fusedPre, bias: bias, rows: rows, columns: columns, activation: &fusedActivation, rounded: &fusedRounded)
        XCTAssertEqual(fusedPre, referencePre)
        XCTAssertEqual(fusedActivation, referenceActivation)
        XCTAssertEqual(fusedRounded, referenceRounded)
        var fusedD = dActivation, fusedBias = gradientStart, fusedDRounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        FloatKernels.geluBackwardBias(fusedPre, &fusedD, rows: rows, columns: columns, biasGradient: &fusedBias, rounded: &fusedDRounded)
        XCTAssertEqual(fusedD, referenceD)
        XCTAssertEqual(fusedBias, referenceBias)
        XCTAssertEqual(fusedDRounded, referenceD.map(BFloat16.init))
        // Without a bf16 copy (fp32 products) the values are the same.
        var plainPre = pre, plainActivation = [Float](repeating: 0, count: count)
        FloatKernels.biasGELU(&plainPre, bias: bias, rows: rows, columns: columns, activation: &plainActivation, rounded: nil)
        XCTAssertEqual(plainActivation, referenceActivation)
        // With the copy only (bf16 products of several rows) the copies are the same, and
        // backward leaves dHidden where it was.
        var copyPre = pre, copyRounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        FloatKernels.biasGELU(&copyPre, bias: bias, rows: rows, columns: columns, activation: nil, rounded: &copyRounded)
        XCTAssertEqual(copyPre, referencePre)
        XCTAssertEqual(copyRounded, referenceRounded)
        var copyD = dActivation, copyBias = gradientStart, copyDRounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: count)
        FloatKernels.geluBackwardBias(copyPre, &copyD, rows: rows, columns: columns, biasGradient: &copyBias, rounded: &copyDRounded,
                                      keepsFloat: false)
        XCTAssertEqual(copyD, dActivation)
        XCTAssertEqual(copyBias, referenceBias)
        XCTAssertEqual(copyDRounded, fusedDRounded)
    }
}
