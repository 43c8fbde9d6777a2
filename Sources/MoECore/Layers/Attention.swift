/// Causal multi-head self-attention.
///
/// Shapes: B sequences of T tokens, C = width, nh heads of hd = C / nh.
/// x: [B*T, C] -> qkv: [B*T, 3C] (row = q | k | v, head h in columns h*hd ..< (h+1)*hd of each)
/// -> probabilities: [B*nh*T, T] -> heads: [B*T, C] -> out: [B*T, C].
/// Every product is one GEMM per (sequence, head) on strided views: no transposes, no copies.
public struct CausalSelfAttention<T: Scalar> {
    public let qkv: Linear<T, Replicated>
    public let projection: Linear<T, Replicated>
    public let heads: Int

    public final class Cache {
        let qkv = Tensor<T>(), probabilities = Tensor<T>(), headOutputs = Tensor<T>()
        // Backward scratch, kept to avoid allocating every step.
        let dQKV = Tensor<T>(), dHeadOutputs = Tensor<T>(), dScores = Tensor<T>()
        public init() {}
    }

    public init(store: ParameterStore<T, Replicated>, name: String, width: Int, heads: Int, residualDeviation: Double) {
        precondition(width % heads == 0, "heads must divide the width")
        qkv = Linear(store: store, name: "\(name).qkv", inputSize: width, outputSize: 3 * width, deviation: 0.02)
        projection = Linear(store: store, name: "\(name).projection", inputSize: width, outputSize: width,
                            deviation: residualDeviation)
        self.heads = heads
    }

    public func forward(_ x: UnsafePointer<T>, batch: Int, length: Int, into out: UnsafeMutablePointer<T>, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, rows = batch * length
        let scale = 1 / T(headSize).squareRoot()
        cache.qkv.resize(rows: rows, columns: 3 * width)
        cache.probabilities.resize(rows: batch * heads * length, columns: length)
        cache.headOutputs.resize(rows: rows, columns: width)
        qkv.forward(x, rows: rows, into: cache.qkv.pointer)
        for b in 0..<batch {
            for h in 0..<heads {
                let q = cache.qkv.pointer + b * length * 3 * width + h * headSize
                let k = q + width, v = q + 2 * width
                let scores = cache.probabilities.pointer + (b * heads + h) * length * length
                // scores[t, j] = scale * q_t · k_j
                gemm(transposeB: true, m: length, n: length, k: headSize, alpha: scale,
                     a: q, lda: 3 * width, b: k, ldb: 3 * width, c: scores)
                for t in 0..<length {
                    let row = scores + t * length
                    Kernels.softmaxRow(row, count: t + 1)
                    for j in (t + 1)..<length { row[j] = 0 }
                }
                // heads[t, h] = Σ_j p[t, j] v_j
                gemm(m: length, n: headSize, k: length, a: scores, lda: length, b: v, ldb: 3 * width,
                     c: cache.headOutputs.pointer + b * length * width + h * headSize, ldc: width)
            }
        }
        projection.forward(cache.headOutputs.pointer, rows: rows, into: out)
    }

    /// Adjoint of `forward`; accumulates into dx and the parameter gradients.
    public func backward(_ x: UnsafePointer<T>, _ dOut: UnsafePointer<T>, batch: Int, length: Int,
                         dx: UnsafeMutablePointer<T>, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, rows = batch * length
        let scale = 1 / T(headSize).squareRoot()
        cache.dHeadOutputs.resize(rows: rows, columns: width, zero: true)
        cache.dQKV.resize(rows: rows, columns: 3 * width, zero: true)
        cache.dScores.resize(rows: length, columns: length)
        projection.backward(cache.headOutputs.pointer, dOut, rows: rows, dx: cache.dHeadOutputs.pointer)
        let dScores = cache.dScores.pointer
        for b in 0..<batch {
            for h in 0..<heads {
                let offset = b * length * 3 * width + h * headSize
                let q = cache.qkv.pointer + offset, k = q + width, v = q + 2 * width
                let dq = cache.dQKV.pointer + offset, dk = dq + width, dv = dq + 2 * width
                let probabilities = cache.probabilities.pointer + (b * heads + h) * length * length
                let dHeads = cache.dHeadOutputs.pointer + b * length * width + h * headSize
                // heads = P V  =>  dP = dHeads Vᵀ, dV += Pᵀ dHeads
                gemm(transposeB: true, m: length, n: length, k: headSize, a: dHeads, lda: width, b: v, ldb: 3 * width,
                     c: dScores)
                gemm(transposeA: true, m: length, n: headSize, k: length, a: probabilities, lda: length,
                     b: dHeads, ldb: width, beta: 1, c: dv, ldc: 3 * width)
                // P = softmax(S) over j <= t
                for t in 0..<length {
                    let row = dScores + t * length
                    Kernels.softmaxBackwardRow(probabilities: probabilities + t * length, row, count: t + 1)
                    for j in (t + 1)..<length { row[j] = 0 }
                }
                // S = scale Q Kᵀ  =>  dQ += scale dS K, dK += scale dSᵀ Q
                gemm(m: length, n: headSize, k: length, alpha: scale, a: dScores, lda: length, b: k, ldb: 3 * width,
                     beta: 1, c: dq, ldc: 3 * width)
                gemm(transposeA: true, m: length, n: headSize, k: length, alpha: scale, a: dScores, lda: length,
                     b: q, ldb: 3 * width, beta: 1, c: dk, ldc: 3 * width)
            }
        }
        qkv.backward(x, cache.dQKV.pointer, rows: rows, dx: dx)
    }
}
