#if canImport(Glibc)
import Glibc
#endif

/// Tiled causal attention for long sequences (the FlashAttention recurrence, on fp32 GEMMs over
/// tiles): for each (sequence, head) and each tile of query rows, the key tiles up to the
/// diagonal are visited once with an online softmax, so the T x T probabilities never exist.
/// Forward keeps only the output and each row's log-sum-exp L; backward recomputes every
/// probability tile as exp(S - L). Memory: O(B nh T) plus two tile x tile scratch tiles.
///
/// Shapes as in CausalSelfAttention: q, k, v are strided views of the QKV rows [B*T, 3C] (head h
/// in columns h*hd ..< (h+1)*hd), outputs [B*T, C]; L [B*nh, T].
extension CausalSelfAttention {
    /// Views of one (sequence, head) pair, offsets in elements.
    private func pair(_ b: Int, _ h: Int, length: Int, width: Int) -> (qkv: Int, heads: Int, rows: Int) {
        (b * length * 3 * width + h * (width / heads), b * length * width + h * (width / heads), (b * heads + h) * length)
    }

    func forwardTiled(batch: Int, length: Int, cache: Cache) {
        let width = projection.inputSize
        cache.logSumExp.resize(rows: batch * heads, columns: length)
        cache.scoreTile.resize(rows: tile, columns: tile)
        if cache.runningMax.count != tile { cache.runningMax = Array(repeating: 0, count: tile); cache.runningSum = cache.runningMax }
        for b in 0..<batch {
            for h in 0..<heads {
                let offsets = pair(b, h, length: length, width: width)
                for start in stride(from: 0, to: length, by: tile) {
                    forwardQueryTile(start: start, rows: min(tile, length - start), length: length, offsets: offsets, cache: cache)
                }
            }
        }
    }

    /// Rows start ..< start + rows of one pair: O = Σ over key tiles of exp(S - m) V, rescaled as
    /// the running max m grows, divided by the running sum at the end.
    private func forwardQueryTile(start: Int, rows: Int, length: Int, offsets: (qkv: Int, heads: Int, rows: Int), cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, scale = 1 / T(headSize).squareRoot()
        let q = cache.qkv.pointer + offsets.qkv, k = q + width, v = q + 2 * width
        let output = cache.headOutputs.pointer + offsets.heads + start * width
        let scores = cache.scoreTile.pointer
        for i in 0..<rows {
            cache.runningMax[i] = -.infinity
            cache.runningSum[i] = 0
            (output + i * width).update(repeating: 0, count: headSize)
        }
        for keyStart in stride(from: 0, to: start + rows, by: tile) {
            let keys = min(tile, length - keyStart)
            gemm(transposeB: true, m: rows, n: keys, k: headSize, alpha: scale, a: q + start * 3 * width, lda: 3 * width,
                 b: k + keyStart * 3 * width, ldb: 3 * width, c: scores, ldc: tile)
            for i in 0..<rows {
                let row = scores + i * tile, visible = min(keys, start + i - keyStart + 1)
                guard visible > 0 else { row.update(repeating: 0, count: keys); continue }
                var maximum = cache.runningMax[i]
                for j in 0..<visible where row[j] > maximum { maximum = row[j] }
                let rescale = cache.runningMax[i] == -.infinity ? 0 : T(Glibc.exp(Double(cache.runningMax[i] - maximum)))
                cache.runningSum[i] = cache.runningSum[i] * rescale + Kernels.expShifted(row, count: visible, shift: maximum)
                (row + visible).update(repeating: 0, count: keys - visible)
                cache.runningMax[i] = maximum
                if rescale != 1 { for c in 0..<headSize { output[i * width + c] *= rescale } }
            }
            gemm(m: rows, n: headSize, k: keys, a: scores, lda: tile, b: v + keyStart * 3 * width, ldb: 3 * width,
                 beta: 1, c: output, ldc: width)
        }
        let logSumExp = cache.logSumExp.pointer + offsets.rows + start
        for i in 0..<rows {
            let inverse = 1 / cache.runningSum[i]
            for c in 0..<headSize { output[i * width + c] *= inverse }
            logSumExp[i] = cache.runningMax[i] + T(Glibc.log(Double(cache.runningSum[i])))
        }
    }

    /// Adjoint of `forwardTiled`, from dHeads (in `cache.dHeadOutputs`) into `cache.dQKV`.
    func backwardTiled(batch: Int, length: Int, cache: Cache) {
        let width = projection.inputSize, headSize = width / heads
        cache.scoreTile.resize(rows: tile, columns: tile)
        cache.gradientTile.resize(rows: tile, columns: tile)
        if cache.rowDot.count != length { cache.rowDot = Array(repeating: 0, count: length) }
        for b in 0..<batch {
            for h in 0..<heads {
                let offsets = pair(b, h, length: length, width: width)
                // D_t = <dO_t, O_t>: the softmax backward's row term, once per row.
                for t in 0..<length {
                    cache.rowDot[t] = Kernels.dot(cache.dHeadOutputs.pointer + offsets.heads + t * width,
                                                  cache.headOutputs.pointer + offsets.heads + t * width, count: headSize)
                }
                for start in stride(from: 0, to: length, by: tile) {
                    for keyStart in stride(from: 0, to: start + min(tile, length - start), by: tile) {
                        backwardTilePair(start: start, rows: min(tile, length - start), keyStart: keyStart,
                                         keys: min(tile, length - keyStart), offsets: offsets, cache: cache)
                    }
                }
            }
        }
    }

    /// One (query tile, key tile): P = exp(scale Q Kᵀ - L) (masked), dV += Pᵀ dO, dP = dO Vᵀ,
    /// dS = P ⊙ (dP - D), dQ += scale dS K, dK += scale dSᵀ Q.
    private func backwardTilePair(start: Int, rows: Int, keyStart: Int, keys: Int, offsets: (qkv: Int, heads: Int, rows: Int),
                                  cache: Cache) {
        let width = projection.inputSize, headSize = width / heads, scale = 1 / T(headSize).squareRoot()
        let q = cache.qkv.pointer + offsets.qkv, k = q + width, v = q + 2 * width
        let dq = cache.dQKV.pointer + offsets.qkv, dk = dq + width, dv = dq + 2 * width
        let dOut = cache.dHeadOutputs.pointer + offsets.heads + start * width
        let probabilities = cache.scoreTile.pointer, dScores = cache.gradientTile.pointer
        let logSumExp = cache.logSumExp.pointer + offsets.rows + start
        gemm(transposeB: true, m: rows, n: keys, k: headSize, alpha: scale, a: q + start * 3 * width, lda: 3 * width,
             b: k + keyStart * 3 * width, ldb: 3 * width, c: probabilities, ldc: tile)
        for i in 0..<rows {
            let row = probabilities + i * tile, visible = max(0, min(keys, start + i - keyStart + 1))
            _ = Kernels.expShifted(row, count: visible, shift: logSumExp[i])
            (row + visible).update(repeating: 0, count: keys - visible)
        }
        gemm(transposeA: true, m: keys, n: headSize, k: rows, a: probabilities, lda: tile, b: dOut, ldb: width,
             beta: 1, c: dv + keyStart * 3 * width, ldc: 3 * width)
        gemm(transposeB: true, m: rows, n: keys, k: headSize, a: dOut, lda: width, b: v + keyStart * 3 * width, ldb: 3 * width,
             c: dScores, ldc: tile)
        for i in 0..<rows {
            let p = probabilities + i * tile, d = dScores + i * tile, rowTerm = cache.rowDot[start + i]
            for j in 0..<keys { d[j] = p[j] * (d[j] - rowTerm) }
        }
        gemm(m: rows, n: headSize, k: keys, alpha: scale, a: dScores, lda: tile, b: k + keyStart * 3 * width, ldb: 3 * width,
             beta: 1, c: dq + start * 3 * width, ldc: 3 * width)
        gemm(transposeA: true, m: keys, n: headSize, k: rows, alpha: scale, a: dScores, lda: tile, b: q + start * 3 * width,
             ldb: 3 * width, beta: 1, c: dk + keyStart * 3 * width, ldc: 3 * width)
    }
}
