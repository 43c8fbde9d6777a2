#if canImport(Glibc)
import Glibc
#endif

/// Incremental decoding with a key/value cache: the prompt is run once (prefill), then each new
/// token is one position. Every block keeps the keys and values of the positions seen so far, so
/// a position costs O(layers · (C² + T C)) instead of a forward over the whole window.
///
/// gpt2: positions are absolute (learned position embeddings), so a window cannot slide by one
/// token without recomputing everything; when it is full the sampler keeps the last half of the
/// window and refills the cache from it (`Sampler` does the same without a cache, so the two give
/// the same tokens). llama: keys are rotated at their absolute positions and attention depends
/// only on distances, so a full cache drops its oldest position and the window slides by one.
/// Routing in generation is dropless: a token's experts never depend on the
/// other tokens of the window. Shapes: new rows n, width C, cache [context, C] per block for K and V.
public final class DecodeCache<T: Scalar> {
    /// Positions held.
    public internal(set) var count = 0
    /// The absolute position of the oldest position held (> 0 once a llama window slid).
    public internal(set) var firstPosition = 0
    var keys: [Tensor<T>] = [], values: [Tensor<T>] = []
    // Per-call activations [n, C | 3C | H], scratch and norm caches.
    let stream = Tensor<T>(), normed = Tensor<T>(), heads = Tensor<T>(), output = Tensor<T>()
    let scores = Tensor<T>(), hidden = FeedForwardStorage<T>(), logits = Tensor<T>()
    let normCache = NormCache<T>(), attention = CausalSelfAttention<T>.Cache()

    public init() {}

    /// The next token's absolute position.
    public var nextPosition: Int { firstPosition + count }

    public func reset() { (count, firstPosition) = (0, 0) }

    /// Drops the `dropped` oldest positions of every block (a llama window sliding).
    func dropOldest(_ dropped: Int, width: Int) {
        for tensor in keys + values {
            memmove(tensor.pointer, tensor.pointer + dropped * width, (count - dropped) * width * MemoryLayout<T>.stride)
        }
        count -= dropped
        firstPosition += dropped
    }
}

extension GPTModel {
    /// Runs `tokens` at the cache's next positions and returns the logits of the last one [V]
    /// (valid until the next call). gpt2: the caller keeps cache.count + n <= context; llama: a
    /// full cache drops its oldest positions to make room.
    public func decode(_ tokens: [Int32], cache: DecodeCache<T>, noiseKey: RandomKey, step: Int) throws -> UnsafeMutablePointer<T> {
        let rows = tokens.count, width = config.width
        precondition(rows > 0 && rows <= config.context, "the window holds at most model.context positions")
        if cache.keys.count != config.layers {
            cache.keys = (0..<config.layers).map { _ in Tensor<T>(rows: config.context, columns: width) }
            cache.values = (0..<config.layers).map { _ in Tensor<T>(rows: config.context, columns: width) }
        }
        if cache.count + rows > config.context {
            precondition(embedding.positionTable == nil, "learned positions: the window holds at most model.context positions")
            cache.dropOldest(cache.count + rows - config.context, width: width)
        }
        let start = cache.count
        // llama: the rotary tables (one for every block) reach the new positions.
        blocks.first?.attention.rotary?.reserve(positions: cache.nextPosition + rows)
        for tensor in [cache.stream, cache.normed, cache.heads, cache.output] { tensor.resize(rows: rows, columns: width) }
        for (row, token) in tokens.enumerated() {
            embedding.embed(token, position: cache.nextPosition + row, into: cache.stream.row(row))
        }
        for (layer, block) in blocks.enumerated() {
            block.attentionNorm.forward(cache.stream.pointer, rows: rows, into: cache.normed.pointer, cache: cache.normCache)
            attend(block.attention, layer: layer, rows: rows, start: start, cache: cache)
            Kernels.add(cache.output.pointer, into: cache.stream.pointer, count: rows * width)
            block.feedForwardNorm.forward(cache.stream.pointer, rows: rows, into: cache.normed.pointer, cache: cache.normCache)
            try feedForward(block.feedForward, layer: layer, tokens: tokens, cache: cache, noiseKey: noiseKey, step: step)
            Kernels.add(cache.output.pointer, into: cache.stream.pointer, count: rows * width)
        }
        cache.count += rows
        // Logits of the last new row only.
        let last = cache.stream.pointer + (rows - 1) * width
        cache.normed.resize(rows: 1, columns: width)
        finalNorm.forward(last, rows: 1, into: cache.normed.pointer, cache: cache.normCache)
        cache.logits.resize(rows: 1, columns: vocabularySize)
        let matmul = replicated.matmul
        if let head {
            matrixProduct(matmul, m: 1, n: vocabularySize, k: width, a: .values(cache.normed.pointer), b: head.operand, c: cache.logits.pointer)
        } else {
            matrixProduct(matmul, transposeB: true, m: 1, n: vocabularySize, k: width, a: .values(cache.normed.pointer),
                          b: embedding.tokenTable.operand, c: cache.logits.pointer)
        }
        return cache.logits.pointer
    }

    /// Appends the new rows' keys and values to block `layer`'s cache, then each new row attends
    /// to the positions up to its own: heads = softmax(scale q Kᵀ) V, then the projection.
    private func attend(_ attention: CausalSelfAttention<T>, layer: Int, rows: Int, start: Int, cache: DecodeCache<T>) {
        let width = config.width, heads = attention.heads, headSize = width / heads, total = start + rows
        attention.projectInputs(cache.normed.pointer, rows: rows, positions: .from(cache.nextPosition), cache: cache.attention)
        let qkv = cache.attention.qkv
        for row in 0..<rows {
            (cache.keys[layer].row(start + row)).update(from: qkv.row(row) + width, count: width)
            (cache.values[layer].row(start + row)).update(from: qkv.row(row) + 2 * width, count: width)
        }
        cache.scores.resize(rows: rows, columns: total)
        let scale = 1 / T(headSize).squareRoot()
        for h in 0..<heads {
            let offset = h * headSize
            gemm(transposeB: true, m: rows, n: total, k: headSize, alpha: scale, a: qkv.pointer + offset, lda: 3 * width,
                 b: cache.keys[layer].pointer + offset, ldb: width, c: cache.scores.pointer)
            for row in 0..<rows {
                let visible = start + row + 1, scores = cache.scores.row(row)
                Kernels.softmax(row: scores, count: visible)
                (scores + visible).update(repeating: 0, count: total - visible)
            }
            gemm(m: rows, n: headSize, k: total, a: cache.scores.pointer, b: cache.values[layer].pointer + offset, ldb: width,
                 c: cache.heads.pointer + offset, ldc: width)
        }
        attention.projection.forward(cache.heads.pointer, rows: rows, into: cache.output.pointer)
    }

    private func feedForward(_ block: FeedForwardBlock<T>, layer: Int, tokens: [Int32], cache: DecodeCache<T>,
                             noiseKey: RandomKey, step: Int) throws {
        let rows = tokens.count
        switch block {
        case let .dense(ffn):
            cache.hidden.resize(rows: rows, for: ffn, rounded: false)
            ffn.forward(cache.normed.pointer, rows: rows, into: cache.output.pointer, hidden: cache.hidden.hidden())
        case let .moe(moe):
            try tokens.withUnsafeBufferPointer { ids in
                var context = RoutingContext(training: false, communicator: communicator, globalTokens: rows, firstGlobalToken: 0,
                                             tokenIds: ids.baseAddress, noiseKey: noiseKey.derive(layer), step: step)
                context.dropless = true
                try moe.forward(cache.normed.pointer, rows: rows, into: cache.output.pointer, context: context)
            }
        }
    }
}
