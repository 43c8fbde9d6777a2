import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// The llama block's layers: RMSNorm, rotary embeddings, grouped-query attention with the query
/// and key norms, SwiGLU; finite-difference checks in Double and the Float paths against them.
final class LlamaBlockTests: XCTestCase {
    let checker = GradientChecker()

    func testRMSNorm() {
        let store = ParameterStore<Double, Replicated>()
        let norm = RMSNorm(store: store, path: ParameterPath("norm", role: .norm), width: 6, epsilon: 1e-6, decay: false)
        for i in 0..<6 { norm.gain.value[i] = 1 + 0.1 * Double(i) }
        let x = randomTensor(rows: 3, columns: 6, seed: 6, scale: 2), projection = randomTensor(rows: 3, columns: 6, seed: 7)
        let y = Tensor<Double>(rows: 3, columns: 6), dx = Tensor<Double>(rows: 3, columns: 6)
        let cache = NormCache<Double>()
        func loss() -> Double { norm.forward(x.pointer, rows: 3, into: y.pointer, cache: cache); return projectedLoss(y, projection) }
        _ = loss()
        // y = x / rms(x) · gain, by hand for the first row.
        let rms = (x.array[0..<6].reduce(0) { $0 + $1 * $1 } / 6 + 1e-6).squareRoot()
        XCTAssertEqual(y.array[2], x.array[2] / rms * 1.2, accuracy: 1e-12)
        norm.backward(x.pointer, projection.pointer, rows: 3, dx: dx.pointer, cache: cache)
        checker.check("gain", values: norm.gain.value, gradients: norm.gain.gradient, count: 6, loss: loss)
        checker.check("x", values: x.pointer, gradients: dx.pointer, count: 18, loss: loss)
    }

    /// Float's vectorised RMSNorm against the Double reference; width 37: two vectors and a tail.
    func testRMSNormFloatPathMatchesTheDoubleReference() {
        let rows = 4, width = 37
        let doubleStore = ParameterStore<Double, Replicated>(), floatStore = ParameterStore<Float, Replicated>()
        let doubleNorm = RMSNorm(store: doubleStore, path: ParameterPath("n", role: .norm), width: width, epsilon: 1e-5, decay: false)
        let floatNorm = RMSNorm(store: floatStore, path: ParameterPath("n", role: .norm), width: width, epsilon: 1e-5, decay: false)
        for i in 0..<width { doubleNorm.gain.value[i] = 1 + 0.03 * Double(i); floatNorm.gain.value[i] = Float(doubleNorm.gain.value[i]) }
        let x = randomTensor(rows: rows, columns: width, seed: 8, scale: 2), dy = randomTensor(rows: rows, columns: width, seed: 9)
        let floatX = Tensor<Float>(rows: rows, columns: width, values: x.array.map(Float.init))
        let floatDy = Tensor<Float>(rows: rows, columns: width, values: dy.array.map(Float.init))
        let y = Tensor<Double>(rows: rows, columns: width), floatY = Tensor<Float>(rows: rows, columns: width)
        let dx = Tensor<Double>(rows: rows, columns: width), floatDx = Tensor<Float>(rows: rows, columns: width)
        let cache = NormCache<Double>(), floatCache = NormCache<Float>()
        doubleNorm.forward(x.pointer, rows: rows, into: y.pointer, cache: cache)
        floatNorm.forward(floatX.pointer, rows: rows, into: floatY.pointer, cache: floatCache)
        doubleNorm.backward(x.pointer, dy.pointer, rows: rows, dx: dx.pointer, cache: cache)
        floatNorm.backward(floatX.pointer, floatDy.pointer, rows: rows, dx: floatDx.pointer, cache: floatCache)
        assertClose(floatY.array, y.array, 2e-5, "y")
        assertClose(floatDx.array, dx.array, 2e-5, "dx")
        assertClose(Array(UnsafeBufferPointer(start: floatNorm.gain.gradient, count: width)),
                    Array(UnsafeBufferPointer(start: doubleNorm.gain.gradient, count: width)), 2e-5, "dgain")
        withExtendedLifetime((doubleStore, floatStore)) {}
    }

    /// Rotated queries and keys: q_m · k_n depends only on m - n, and norms are kept.
    func testRotaryScoresDependOnlyOnDistance() {
        let rotary = RotaryEmbedding<Double>(headSize: 8, theta: 10_000, positions: 4)
        let q = randomTensor(rows: 1, columns: 8, seed: 1), k = randomTensor(rows: 1, columns: 8, seed: 2)
        func score(_ m: Int, _ n: Int) -> Double {
            let a = Tensor<Double>(rows: 1, columns: 8, values: q.array), b = Tensor<Double>(rows: 1, columns: 8, values: k.array)
            rotary.reserve(positions: max(m, n) + 1)
            rotary.rotate(a.pointer, heads: 1, position: m)
            rotary.rotate(b.pointer, heads: 1, position: n)
            return zip(a.array, b.array).reduce(0) { $0 + $1.0 * $1.1 }
        }
        XCTAssertEqual(score(3, 1), score(1002, 1000), accuracy: 1e-9)
        XCTAssertEqual(score(0, 5), score(20, 25), accuracy: 1e-9)
        XCTAssertNotEqual(score(3, 1), score(3, 2), accuracy: 1e-6)
        // The inverse undoes the rotation.
        let a = Tensor<Double>(rows: 1, columns: 8, values: q.array)
        rotary.rotate(a.pointer, heads: 1, position: 77)
        rotary.rotate(a.pointer, heads: 1, position: 77, inverse: true)
        for (u, v) in zip(a.array, q.array) { XCTAssertEqual(u, v, accuracy: 1e-12) }
    }

    /// Grouped-query attention with RoPE and each query/key norm, on the full and tiled paths.
    func testLlamaAttention() {
        for (keyValueHeads, norm, tile) in [(2, QueryKeyNorm.none, 128), (1, .head, 128), (4, .full, 128), (2, .head, 2)] {
            let store = ParameterStore<Double, Replicated>()
            let options = CausalSelfAttention<Double>.LlamaOptions(keyValueHeads: keyValueHeads,
                                                                   rotary: RotaryEmbedding(headSize: 4, theta: 100, positions: 8),
                                                                   queryKeyNorm: norm, normEpsilon: 1e-6, decayNorms: false)
            let attention = CausalSelfAttention(store: store, path: ParameterPath("attention", role: .attention), width: 16, heads: 4,
                                                residualDeviation: 0.3, tile: tile, llama: options)
            store.initialize(key: RandomKey(8))
            for index in 0..<store.count { store.values[index] *= 6 }   // visible rotations and softmax curvature
            XCTAssertNil(attention.qkv.bias)
            XCTAssertEqual(attention.qkv.outputSize, 16 + 2 * keyValueHeads * 4)
            checker.checkAttention(attention, store: store, label: "kv \(keyValueHeads), qk_norm \(norm), tile \(tile): ")
        }
    }

    func testSwiGLUFeedForward() {
        let store = ParameterStore<Double, ExpertSharded>()
        let ffn = FeedForward(store: store, path: ParameterPath("ffn", role: .feedForward), width: 4, hiddenSize: 6,
                              residualDeviation: 0.5, architecture: .llama)
        store.initialize(key: RandomKey(12))
        XCTAssertNil(ffn.up.bias)
        XCTAssertNil(ffn.down.bias)
        XCTAssertEqual(store.count, FeedForward<Double, ExpertSharded>.parameterCount(width: 4, hiddenSize: 6, architecture: .llama))
        let x = randomTensor(rows: 3, columns: 4, seed: 13, scale: 3), projection = randomTensor(rows: 3, columns: 4, seed: 14)
        let y = Tensor<Double>(rows: 3, columns: 4), dx = Tensor<Double>(rows: 3, columns: 4)
        let hidden = FeedForwardStorage<Double>(), scratch = Tensor<Double>(rows: 3, columns: ffn.scratchColumns)
        hidden.resize(rows: 3, for: ffn, rounded: false)
        func loss() -> Double {
            ffn.forward(x.pointer, rows: 3, into: y.pointer, hidden: hidden.hidden())
            return projectedLoss(y, projection)
        }
        _ = loss()
        // y = (silu(x W_gate) ⊙ x W_up) W_down, by hand for one output.
        let w = store.values, up = ffn.up.weight.value - w, down = ffn.down.weight.value - w
        var expected = 0.0
        for j in 0..<6 {
            var g = 0.0, u = 0.0
            for c in 0..<4 { g += x.array[c] * w[up + c * 12 + j]; u += x.array[c] * w[up + c * 12 + 6 + j] }
            expected += g / (1 + Foundation.exp(-g)) * u * w[down + j * 4 + 1]
        }
        XCTAssertEqual(y.array[1], expected, accuracy: 1e-12)
        ffn.backward(x.pointer, projection.pointer, rows: 3, dx: dx.pointer, hidden: hidden.hidden(), scratch: scratch.pointer)
        for (name, parameter) in [("up.weight", ffn.up.weight), ("down.weight", ffn.down.weight)] {
            checker.check(name, values: parameter.value, gradients: parameter.gradient, count: parameter.count, loss: loss)
        }
        checker.check("x", values: x.pointer, gradients: dx.pointer, count: 12, loss: loss)
    }

    /// The fused Float SwiGLU passes against the Double reference, and their bf16 copies are the
    /// rounding of the values they wrote; 37 columns: two vectors and a tail per row.
    func testSwiGLUFloatPassesMatchTheDoubleReference() {
        let rows = 3, hidden = 37
        let pre = randomTensor(rows: rows, columns: 2 * hidden, seed: 20, scale: 2), dA = randomTensor(rows: rows, columns: hidden, seed: 21)
        let activation = Tensor<Double>(rows: rows, columns: hidden), dPre = Tensor<Double>(rows: rows, columns: 2 * hidden)
        Kernels.swiGLUForward(pre.pointer, rows: rows, hidden: hidden, activation: activation.pointer)
        Kernels.swiGLUBackward(pre.pointer, dA.pointer, rows: rows, hidden: hidden, dPre: dPre.pointer)
        let floatPre = pre.array.map(Float.init), floatDA = dA.array.map(Float.init)
        var floatActivation = [Float](repeating: 0, count: rows * hidden), floatDPre = [Float](repeating: 0, count: rows * 2 * hidden)
        var rounded = [BFloat16](repeating: BFloat16(bitPattern: 0), count: rows * 2 * hidden)
        FloatKernels.swiGLU(floatPre, rows: rows, hidden: hidden, activation: &floatActivation, rounded: &rounded)
        XCTAssertEqual(Array(rounded[0..<rows * hidden]), floatActivation.map(BFloat16.init))
        assertClose(floatActivation, activation.array, 3e-6, "activation")
        FloatKernels.swiGLUBackward(floatPre, floatDA, rows: rows, hidden: hidden, dPre: &floatDPre, rounded: &rounded)
        XCTAssertEqual(rounded, floatDPre.map(BFloat16.init))
        assertClose(floatDPre, dPre.array, 3e-6, "dPre")
    }

    func assertClose(_ a: [Float], _ b: [Double], _ tolerance: Double, _ what: String, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, what, line: line)
        for index in 0..<min(a.count, b.count) {
            XCTAssertEqual(Double(a[index]), b[index], accuracy: tolerance * max(1, abs(b[index])), "\(what)[\(index)]", line: line)
        }
    }
}
