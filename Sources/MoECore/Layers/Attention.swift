import MoEIO

/// Causal multi-head self-attention.
///
/// Shapes: B sequences of T tokens, C = width, nh heads of hd = C / nh.
/// x: [B*T, C] -> qkv: [B*T, 3C] (row = q | k | v, head h in columns h*hd ..< (h+1)*hd of each)
/// -> probabilities: [B*nh*T, T] -> heads: [B*T, C] -> out: [B*T, C].
/// The per-head products run over the two halves of the queries, each half against the keys it
/// can see (`causalBlocks`), on strided views of the QKV rows (no transposes, no copies): on
/// OpenBLAS (fp32, and Double for the gradient checks) one GEMM per (sequence, head) and half;
/// on oneDNN (fp32, or bf16 on the rounded QKV rows) one batched matmul per half over all pairs
/// (per-pair products of 128 x 128 x 64 are too small to run at speed one by one). fp32 runs
/// them on oneDNN where the other products do, or where they measured faster there
/// (`ParameterStore.attentionMatmul`).
/// The llama block's extras (AttentionInputs.swift) sit between the QKV projection and the
/// core: the projection gives [B*T, C + 2 Ckv] (kv_heads heads of keys and values), queries and
/// keys are normalised (qk_norm) and rotated at their positions (RoPE), and each key/value head
/// is repeated for its group of query heads, giving the [B*T, 3C] rows every path above reads.
/// Sequences longer than `tile` take the tiled path instead (TiledAttention.swift): online
/// softmax over key tiles, T x T probabilities never stored, recomputed in backward; activation
/// memory linear in T, in either precision (its products are fp32 GEMMs on tiles).
public struct CausalSelfAttention<T: Scalar> {
    public let qkv: Linear<T, Replicated>
    public let projection: Linear<T, Replicated>
    public let heads: Int
    /// Query and key rows per tile of the tiled path, used when T > tile.
    public let tile: Int
    /// Grouped-query attention's key/value heads (= heads without grouping).
    public let keyValueHeads: Int
    /// Llama: the rotary position embedding and the optional query and key norms.
    public let rotary: RotaryEmbedding<T>?
    public let queryNorm: RMSNorm<T>?, keyNorm: RMSNorm<T>?

    public final class Cache {
        let qkv = Tensor<T>(), probabilities = Tensor<T>(), headOutputs = Tensor<T>()
        // Backward scratch, kept to avoid allocating every step.
        let dQKV = Tensor<T>(), dHeadOutputs = Tensor<T>(), dScores = Tensor<T>()
        // Llama: the projection's rows [N, C + 2 Ckv], their gradient, the query and key norms'
        // reciprocals, and one row of scratch.
        let projected = Tensor<T>(), dProjected = Tensor<T>(), queryReciprocals = Tensor<T>(), keyReciprocals = Tensor<T>()
        let rowScratch = Tensor<T>()
        // bf16 mode: rounded QKV and probabilities (kept for backward), rounded gradients.
        let roundedQKV = BFloat16Buffer(), roundedProbabilities = BFloat16Buffer()
        // bf16 mode: the two projections' inputs as their forward products rounded them, read
        // again by their weight gradients (kept: 2 x [N, C] bf16 a layer, against two passes).
        let roundedInput = BFloat16Buffer(), roundedHeadOutputs = BFloat16Buffer()
        let roundedHeadGradient = BFloat16Buffer(), roundedScoreGradient = BFloat16Buffer()
        // Tiled path: per-row log-sum-exp [B*nh, T] (kept for backward), tile scratch, and the
        // running max and sum of the online softmax and the rows' <dO, O> [tile | T].
        let logSumExp = Tensor<T>(), scoreTile = Tensor<T>(), gradientTile = Tensor<T>()
        var runningMax: [T] = [], runningSum: [T] = [], rowDot: [T] = []
        public init() {}
    }

    /// The GPT-2 attention: one QKV projection with biases, learned positions outside.
    public init(store: ParameterStore<T, Replicated>, path: ParameterPath, width: Int, heads: Int, residualDeviation: Double,
                tile: Int = 128) {
        self.init(store: store, path: path, width: width, heads: heads, residualDeviation: residualDeviation, tile: tile,
                  llama: nil)
    }

    /// The llama attention's options: key/value heads, the rotary tables (shared by the blocks),
    /// the query/key norm.
    public struct LlamaOptions {
        public var keyValueHeads: Int, rotary: RotaryEmbedding<T>, queryKeyNorm: QueryKeyNorm, normEpsilon: Double
        public var decayNorms: Bool
    }

    /// `llama` nil: GPT-2 (biases, no rotation); else no biases, RoPE, grouped keys and values.
    public init(store: ParameterStore<T, Replicated>, path: ParameterPath, width: Int, heads: Int, residualDeviation: Double,
                tile: Int, llama: LlamaOptions?) {
        precondition(width % heads == 0, "heads must divide the width")
        precondition(tile > 0, "a tile holds at least one row")
        let keyValueHeads = llama?.keyValueHeads ?? heads, headSize = width / heads
        precondition(heads % keyValueHeads == 0, "key/value heads must divide the heads")
        self.tile = tile
        self.heads = heads
        self.keyValueHeads = keyValueHeads
        let biases = llama == nil
        qkv = Linear(store: store, path: path.appending("qkv"), inputSize: width, outputSize: width + 2 * keyValueHeads * headSize,
                     deviation: 0.02, bias: biases)
        projection = Linear(store: store, path: path.appending("projection"), inputSize: width, outputSize: width,
                            deviation: residualDeviation, bias: biases)
        precondition(llama.map { $0.rotary.headSize == headSize } ?? true, "the rotary tables are for another head size")
        rotary = llama?.rotary
        let norm = llama?.queryKeyNorm ?? .none
        func makeNorm(_ name: String, _ width: Int) -> RMSNorm<T> {
            RMSNorm(store: store, path: path.appending(name), width: width, epsilon: llama!.normEpsilon, decay: llama!.decayNorms)
        }
        queryNorm = norm == .none ? nil : makeNorm("query_norm", norm == .head ? headSize : width)
        keyNorm = norm == .none ? nil : makeNorm("key_norm", norm == .head ? headSize : keyValueHeads * headSize)
    }

    public func forward(_ x: UnsafePointer<T>, batch: Int, length: Int, into out: UnsafeMutablePointer<T>, cache: Cache) {
        let width = projection.inputSize, rows = batch * length
        cache.headOutputs.resize(rows: rows, columns: width)
        projectInputs(x, rows: rows, positions: .cycling(length), cache: cache)
        if length > tile {
            forwardTiled(batch: batch, length: length, cache: cache)
            return projectHeads(rows: rows, into: out, cache: cache)
        }
        attendHeads(batch: batch, length: length, cache: cache, matmul: qkv.weight.store.attentionMatmul)
        projectHeads(rows: rows, into: out, cache: cache)
    }

    /// The per-head products and softmax (QKV rows -> head outputs): batched on `matmul`, else
    /// one GEMM per (sequence, head) on OpenBLAS.
    func attendHeads(batch: Int, length: Int, cache: Cache, matmul: OneDNNMatmul?) {
        cache.probabilities.resize(rows: batch * heads * length, columns: length)
        guard let matmul else { return attendPairs(batch: batch, length: length, cache: cache) }
        if matmul.precision == .bf16 {
            forwardBatched(matmul, BFloat16.self, batch: batch, length: length, cache: cache)
        } else {
            forwardBatched(matmul, Float.self, batch: batch, length: length, cache: cache)
        }
    }

    /// `attendHeads` on OpenBLAS, per (sequence, head), over the query blocks of `causalBlocks`
    /// as the batched path does.
    private func attendPairs(batch: Int, length: Int, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, scale = 1 / T(headSize).squareRoot()
        let blocks = Self.causalBlocks(length: length), size = length / blocks
        for b in 0..<batch {
            for h in 0..<heads {
                let q = cache.qkv.pointer + b * length * 3 * width + h * headSize
                let k = q + width, v = q + 2 * width
                let scores = cache.probabilities.pointer + (b * heads + h) * length * length
                let headOutputs = cache.headOutputs.pointer + b * length * width + h * headSize
                // scores[t, j] = scale * q_t · k_j, for the keys j < (block + 1) size
                for first in stride(from: 0, to: length, by: size) {
                    gemm(transposeB: true, m: size, n: first + size, k: headSize, alpha: scale,
                         a: q + first * 3 * width, lda: 3 * width, b: k, ldb: 3 * width, c: scores + first * length, ldc: length)
                }
                causalSoftmax(scores, rows: length, length: length)
                // heads[t, h] = Σ_j p[t, j] v_j
                for first in stride(from: 0, to: length, by: size) {
                    gemm(m: size, n: headSize, k: first + size, a: scores + first * length, lda: length, b: v, ldb: 3 * width,
                         c: headOutputs + first * width, ldc: width)
                }
            }
        }
    }

    /// out = heads W_o + b_o, keeping the heads' bf16 copy for backward.
    private func projectHeads(rows: Int, into out: UnsafeMutablePointer<T>, cache: Cache) {
        let heads = keptOperand(cache.headOutputs.pointer, count: rows * projection.inputSize, rounding: cache.roundedHeadOutputs)
        projection.forward(heads, rows: rows, into: out, addingBias: true)
    }

    /// `x` as a product operand: in bf16 mode rounded now into `kept`, whose copy the backward
    /// reads again (`kept(_:_:)`); else the values.
    func keptOperand(_ x: UnsafePointer<T>, count: Int, rounding kept: BFloat16Buffer) -> ProductOperand<T> {
        .roundedOnce(x, count: count, into: qkv.weight.store.matmul?.precision == .bf16 ? kept : nil)
    }

    /// The operand `keptOperand` made in forward.
    func kept(_ x: UnsafePointer<T>, _ kept: BFloat16Buffer) -> ProductOperand<T> {
        .prerounded(x, qkv.weight.store.matmul?.precision == .bf16 ? UnsafePointer(kept.pointer) : nil)
    }

    /// Adjoint of `forward`; accumulates into dx and the parameter gradients.
    public func backward(_ x: UnsafePointer<T>, _ dOut: UnsafePointer<T>, batch: Int, length: Int,
                         dx: UnsafeMutablePointer<T>, cache: Cache) {
        let width = projection.inputSize, rows = batch * length
        let matmul = qkv.weight.store.attentionMatmul, batched = matmul != nil && length <= tile
        cache.dHeadOutputs.resize(rows: rows, columns: width)
        // The batched products write every column of dQKV; the per-head and tiled paths add into it.
        cache.dQKV.resize(rows: rows, columns: 3 * width, zero: !batched)
        projection.backward(kept(cache.headOutputs.pointer, cache.roundedHeadOutputs), .values(dOut), rows: rows,
                            dx: cache.dHeadOutputs.pointer, dxBeta: 0)
        if length > tile {
            backwardTiled(batch: batch, length: length, cache: cache)
            return projectInputsBackward(x, rows: rows, positions: .cycling(length), dx: dx, cache: cache)
        }
        attendHeadsBackward(batch: batch, length: length, cache: cache, matmul: matmul)
        projectInputsBackward(x, rows: rows, positions: .cycling(length), dx: dx, cache: cache)
    }

    /// Adjoint of `attendHeads`, from dHeads (in `cache.dHeadOutputs`) to dQKV: written by the
    /// batched products, added per pair (into dQKV the caller zeroed).
    func attendHeadsBackward(batch: Int, length: Int, cache: Cache, matmul: OneDNNMatmul?) {
        guard let matmul else {
            cache.dScores.resize(rows: length, columns: length)
            for b in 0..<batch {
                for h in 0..<heads { backwardPair(b, h, length: length, cache: cache) }
            }
            return
        }
        if matmul.precision == .bf16 {
            backwardBatched(matmul, BFloat16.self, batch: batch, length: length, cache: cache)
        } else {
            backwardBatched(matmul, Float.self, batch: batch, length: length, cache: cache)
        }
    }

    /// Backward of one (sequence, head) pair on strided views (OpenBLAS, Double), from dHeads to
    /// dQKV (added), over the query blocks of `causalBlocks`: dP and dQ by query block (keys
    /// [0, (i+1)·bs)), dV and dK by key block j (queries [j·bs, T)), as `backwardBatched`.
    private func backwardPair(_ b: Int, _ h: Int, length: Int, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, qkvRow = 3 * width, scale = 1 / T(headSize).squareRoot()
        let blocks = Self.causalBlocks(length: length), size = length / blocks
        let offset = b * length * qkvRow + h * headSize, dScores = cache.dScores.pointer
        let q = cache.qkv.pointer + offset, k = q + width, v = q + 2 * width
        let dq = cache.dQKV.pointer + offset, dk = dq + width, dv = dq + 2 * width
        let probabilities = cache.probabilities.pointer + (b * heads + h) * length * length
        let dHeads = cache.dHeadOutputs.pointer + b * length * width + h * headSize
        // heads = P V  =>  dP = dHeads Vᵀ, dV += Pᵀ dHeads
        for first in stride(from: 0, to: length, by: size) {
            gemm(transposeB: true, m: size, n: first + size, k: headSize, a: dHeads + first * width, lda: width,
                 b: v, ldb: qkvRow, c: dScores + first * length, ldc: length)
            gemm(transposeA: true, m: size, n: headSize, k: length - first, a: probabilities + first * length + first, lda: length,
                 b: dHeads + first * width, ldb: width, beta: 1, c: dv + first * qkvRow, ldc: qkvRow)
        }
        // P = softmax(S) over j <= t
        causalSoftmaxBackward(probabilities: probabilities, dScores, rows: length, length: length)
        // S = scale Q Kᵀ  =>  dQ += scale dS K, dK += scale dSᵀ Q
        for first in stride(from: 0, to: length, by: size) {
            gemm(m: size, n: headSize, k: first + size, alpha: scale, a: dScores + first * length, lda: length,
                 b: k, ldb: qkvRow, beta: 1, c: dq + first * qkvRow, ldc: qkvRow)
            gemm(transposeA: true, m: size, n: headSize, k: length - first, alpha: scale, a: dScores + first * length + first,
                 lda: length, b: q + first * qkvRow, ldb: qkvRow, beta: 1, c: dk + first * qkvRow, ldc: qkvRow)
        }
    }

    /// Causal softmax of every row of `scores` [B*nh*T, T] in place (row t keeps keys j <= t);
    /// with `rounded` (bf16 mode, T = Float), each row's bf16 copy too, while the row is in cache.
    private func causalSoftmax(_ scores: UnsafeMutablePointer<T>, rows: Int, length: Int,
                               rounded: UnsafeMutablePointer<BFloat16>? = nil) {
        if usesRowKernels(length: length) {
            return forEachRow(rows: rows, length: length) { row, rounding in
                FloatKernels.causalSoftmaxRow(asFloat(scores) + row * length, visible: row % length + 1, length: length,
                                              rounded: rounded.map { $0 + row * length }, rounding: rounding)
            }
        }
        forEachCausalRow(of: scores, rows: rows, length: length, rounded: rounded) { _, values, visible in
            Kernels.softmax(row: values, count: visible)
        }
    }

    /// Adjoint of `causalSoftmax`: every row of dScores [B*nh*T, T] becomes dS in place, given
    /// the probabilities of the same rows; with `rounded`, each row's bf16 copy too.
    private func causalSoftmaxBackward(probabilities: UnsafePointer<T>, _ dScores: UnsafeMutablePointer<T>, rows: Int, length: Int,
                                       rounded: UnsafeMutablePointer<BFloat16>? = nil) {
        if usesRowKernels(length: length) {
            return forEachRow(rows: rows, length: length) { row, rounding in
                FloatKernels.causalSoftmaxBackwardRow(probabilities: asFloat(probabilities) + row * length, asFloat(dScores) + row * length,
                                                      visible: row % length + 1, length: length,
                                                      rounded: rounded.map { $0 + row * length }, rounding: rounding)
            }
        }
        forEachCausalRow(of: dScores, rows: rows, length: length, rounded: rounded) { row, dRow, visible in
            Kernels.softmaxBackwardRow(probabilities: probabilities + row * length, dRow, count: visible)
        }
    }

    /// Whether the causal softmax and its adjoint run each row as one masked vector kernel
    /// (`FloatKernels.causalSoftmaxRow`: Float rows of whole 16-lane blocks); else row by row.
    private func usesRowKernels(length: Int) -> Bool { T.self == Float.self && length % 16 == 0 }

    /// `body(row, rounding)` on every row, rows split over one process's threads (the Float
    /// rows of whole 16-lane blocks, whose kernels mask, zero and round each row themselves).
    private func forEachRow(rows: Int, length: Int, _ body: (Int, VectorRounding) -> Void) {
        let rounding = VectorRounding()
        BLASInfo.splitElementwise(rows, grain: 1, elementsPerUnit: length) { first, end in
            for row in first..<end { body(row, rounding) }
        }
    }

    /// `body(row, its values, t + 1)` on the keys row t of its sequence sees; then the row's
    /// later keys are zeroed and, with `rounded`, the whole row's bf16 copy written. Rows split
    /// over one process's threads.
    private func forEachCausalRow(of matrix: UnsafeMutablePointer<T>, rows: Int, length: Int, rounded: UnsafeMutablePointer<BFloat16>?,
                                  _ body: (Int, UnsafeMutablePointer<T>, Int) -> Void) {
        forEachRow(rows: rows, length: length) { row, _ in
            let t = row % length, values = matrix + row * length
            body(row, values, t + 1)
            for j in (t + 1)..<length { values[j] = 0 }
            if let rounded { BFloat16.round(asFloat(UnsafePointer(values)), into: rounded + row * length, count: length) }
        }
    }

    // Strides (sequence, head, row, column) in elements of the views the batched products use:
    // q, k, v inside QKV rows [B, T, 3C]; heads inside [B, T, C]; probabilities [B, nh, T, T].
    private func qkvView(length: Int, width: Int, transposed: Bool = false) -> SIMD4<Int> {
        let headSize = width / heads
        return transposed ? SIMD4(length * 3 * width, headSize, 1, 3 * width) : SIMD4(length * 3 * width, headSize, 3 * width, 1)
    }
    private func headView(length: Int, width: Int) -> SIMD4<Int> { SIMD4(length * width, width / heads, width, 1) }
    private func scoreView(length: Int, transposed: Bool = false) -> SIMD4<Int> {
        transposed ? SIMD4(heads * length * length, length * length, 1, length) : SIMD4(heads * length * length, length * length, length, 1)
    }

    /// Query blocks of the per-head products: the causal mask zeroes the probabilities of block i
    /// against the keys of later blocks, so each block's products skip those keys: two halves do
    /// 3/4 of the full T x T products (configs/bench.yaml, T 128, oneDNN's batched products:
    /// attention's products 1 ms a step faster of 15; four blocks were no faster, their products
    /// being smaller).
    static func causalBlocks(length: Int) -> Int { length % 2 == 0 && length >= 16 ? 2 : 1 }

    /// Batched forward of the per-head products on oneDNN: S = scale Q Kᵀ, P = softmax(S) (fp32),
    /// heads = P V, with inputs in `Input` (bf16: QKV and P rounded, and kept for backward). Query
    /// block i (rows [i·bs, (i+1)·bs)) multiplies with the keys [0, (i+1)·bs) only.
    private func forwardBatched<Input: AttentionInput>(_ matmul: OneDNNMatmul, _: Input.Type, batch: Int, length: Int, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, pairs = (batch, heads)
        let blocks = Self.causalBlocks(length: length), size = length / blocks
        let qkvInput = Input.prepare(asFloat(UnsafePointer(cache.qkv.pointer)), count: cache.qkv.count, into: cache.roundedQKV)
        let scores = asFloat(cache.probabilities.pointer), qkvRow = 3 * width
        for block in 0..<blocks {
            let first = block * size, keys = first + size
            matmul.batchedGemm(batch: pairs, m: size, n: keys, k: headSize, alpha: 1 / Float(headSize).squareRoot(),
                               a: qkvInput + first * qkvRow, aStrides: qkvView(length: length, width: width),
                               b: qkvInput + width, bStrides: qkvView(length: length, width: width, transposed: true),
                               c: scores + first * length, cStrides: scoreView(length: length))
        }
        causalSoftmax(cache.probabilities.pointer, rows: batch * heads * length, length: length,
                      rounded: Input.copy(count: cache.probabilities.count, in: cache.roundedProbabilities))
        let probabilities = Input.kept(scores, cache.roundedProbabilities)
        for block in 0..<blocks {
            let first = block * size, keys = first + size
            matmul.batchedGemm(batch: pairs, m: size, n: headSize, k: keys,
                               a: probabilities + first * length, aStrides: scoreView(length: length),
                               b: qkvInput + 2 * width, bStrides: qkvView(length: length, width: width),
                               c: asFloat(cache.headOutputs.pointer) + first * width, cStrides: headView(length: length, width: width))
        }
    }

    /// Adjoint of `forwardBatched`, from dHeads (in `cache.dHeadOutputs`) to dQKV, over the same
    /// blocks: the products into dP and dQ by query block (keys [0, (i+1)·bs)), those into dV
    /// and dK by key block j (queries [j·bs, T)).
    private func backwardBatched<Input: AttentionInput>(_ matmul: OneDNNMatmul, _: Input.Type, batch: Int, length: Int, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, pairs = (batch, heads), qkvRow = 3 * width
        let blocks = Self.causalBlocks(length: length), size = length / blocks
        let qkvInput = Input.kept(asFloat(UnsafePointer(cache.qkv.pointer)), cache.roundedQKV)
        let probabilities = Input.kept(asFloat(UnsafePointer(cache.probabilities.pointer)), cache.roundedProbabilities)
        let dHeads = Input.prepare(asFloat(UnsafePointer(cache.dHeadOutputs.pointer)), count: cache.dHeadOutputs.count,
                                   into: cache.roundedHeadGradient)
        let dQKV = asFloat(cache.dQKV.pointer)
        cache.dScores.resize(rows: batch * heads * length, columns: length)
        let dScoreValues = asFloat(cache.dScores.pointer)
        // heads = P V  =>  dP = dHeads Vᵀ, dV = Pᵀ dHeads
        for block in 0..<blocks {
            let first = block * size, keys = first + size, later = length - first
            matmul.batchedGemm(batch: pairs, m: size, n: keys, k: headSize,
                               a: dHeads + first * width, aStrides: headView(length: length, width: width),
                               b: qkvInput + 2 * width, bStrides: qkvView(length: length, width: width, transposed: true),
                               c: dScoreValues + first * length, cStrides: scoreView(length: length))
            matmul.batchedGemm(batch: pairs, m: size, n: headSize, k: later,
                               a: probabilities + first * length + first, aStrides: scoreView(length: length, transposed: true),
                               b: dHeads + first * width, bStrides: headView(length: length, width: width),
                               c: dQKV + 2 * width + first * qkvRow, cStrides: qkvView(length: length, width: width))
        }
        // P = softmax(S) over j <= t, in fp32 with the fp32 probabilities
        causalSoftmaxBackward(probabilities: cache.probabilities.pointer, cache.dScores.pointer, rows: batch * heads * length,
                              length: length, rounded: Input.copy(count: cache.dScores.count, in: cache.roundedScoreGradient))
        // S = scale Q Kᵀ  =>  dQ = scale dS K, dK = scale dSᵀ Q
        let dScores = Input.kept(asFloat(UnsafePointer(cache.dScores.pointer)), cache.roundedScoreGradient)
        let scale = 1 / Float(headSize).squareRoot()
        for block in 0..<blocks {
            let first = block * size, keys = first + size, later = length - first
            matmul.batchedGemm(batch: pairs, m: size, n: headSize, k: keys, alpha: scale,
                               a: dScores + first * length, aStrides: scoreView(length: length),
                               b: qkvInput + width, bStrides: qkvView(length: length, width: width),
                               c: dQKV + first * qkvRow, cStrides: qkvView(length: length, width: width))
            matmul.batchedGemm(batch: pairs, m: size, n: headSize, k: later, alpha: scale,
                               a: dScores + first * length + first, aStrides: scoreView(length: length, transposed: true),
                               b: qkvInput + first * qkvRow, bStrides: qkvView(length: length, width: width),
                               c: dQKV + width + first * qkvRow, cStrides: qkvView(length: length, width: width))
        }
    }
}

extension CausalSelfAttention where T == Float {
    /// Seconds of one forward and backward of a layer's per-head products and softmax on
    /// `matmul` (fp32; nil: OpenBLAS per head), best of `repeats`, on synthetic QKV rows of
    /// `batch` sequences of `length` tokens: how the kernel choice compares the two engines.
    public static func secondsOfHeadProducts(batch: Int, length: Int, width: Int, heads: Int, matmul: OneDNNMatmul?,
                                             repeats: Int) -> Double {
        let attention = CausalSelfAttention(store: ParameterStore(), path: ParameterPath("attention", role: .attention),
                                            width: width, heads: heads, residualDeviation: 0.02)
        let cache = Cache(), rows = batch * length
        cache.qkv.resize(rows: rows, columns: 3 * width)
        cache.headOutputs.resize(rows: rows, columns: width)
        cache.dHeadOutputs.resize(rows: rows, columns: width)
        for index in 0..<cache.qkv.count { cache.qkv.pointer[index] = Float(index % 13) * 0.01 - 0.06 }
        for index in 0..<cache.dHeadOutputs.count { cache.dHeadOutputs.pointer[index] = Float(index % 7) * 0.01 }
        var best = Double.infinity
        for _ in 0..<repeats {
            cache.dQKV.resize(rows: rows, columns: 3 * width, zero: matmul == nil)
            let started = Clock.nanoseconds()
            attention.attendHeads(batch: batch, length: length, cache: cache, matmul: matmul)
            attention.attendHeadsBackward(batch: batch, length: length, cache: cache, matmul: matmul)
            best = min(best, Double(Clock.nanoseconds() - started) * 1e-9)
        }
        return best
    }
}

/// The input format of attention's batched oneDNN products: fp32 values as they are, or bf16
/// copies rounded into the cache's buffers.
protocol AttentionInput: MatmulInput {
    /// `values` as a product input (rounded into `buffer` for bf16).
    static func prepare(_ values: UnsafePointer<Float>, count: Int, into buffer: BFloat16Buffer) -> UnsafePointer<Self>
    /// The input `prepare` (or a pass writing `copy`) made earlier in the step.
    static func kept(_ values: UnsafePointer<Float>, _ buffer: BFloat16Buffer) -> UnsafePointer<Self>
    /// Room in `buffer` for a pass to write its bf16 copy of `count` values as it computes them
    /// (nil for fp32 input, which is the values themselves).
    static func copy(count: Int, in buffer: BFloat16Buffer) -> UnsafeMutablePointer<BFloat16>?
}

extension Float: AttentionInput {
    static func prepare(_ values: UnsafePointer<Float>, count: Int, into buffer: BFloat16Buffer) -> UnsafePointer<Float> { values }
    static func kept(_ values: UnsafePointer<Float>, _ buffer: BFloat16Buffer) -> UnsafePointer<Float> { values }
    static func copy(count: Int, in buffer: BFloat16Buffer) -> UnsafeMutablePointer<BFloat16>? { nil }
}

extension BFloat16: AttentionInput {
    static func prepare(_ values: UnsafePointer<Float>, count: Int, into buffer: BFloat16Buffer) -> UnsafePointer<BFloat16> {
        UnsafePointer(buffer.round(values, count: count))
    }
    static func kept(_ values: UnsafePointer<Float>, _ buffer: BFloat16Buffer) -> UnsafePointer<BFloat16> { UnsafePointer(buffer.pointer) }
    static func copy(count: Int, in buffer: BFloat16Buffer) -> UnsafeMutablePointer<BFloat16>? { buffer.reserved(count) }
}
