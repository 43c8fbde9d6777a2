/// Where the rows' positions come from: training windows restart at 0 every `length` rows;
/// a decoder's new rows continue from the first position it has not seen.
public enum RowPositions {
    case cycling(Int)
    case from(Int)

    @inline(__always) func position(ofRow row: Int) -> Int {
        switch self {
        case let .cycling(length): return row % length
        case let .from(first): return first + row
        }
    }
}

extension CausalSelfAttention {
    /// Whether the projection's rows need arranging (llama) or are the core's rows already (GPT-2).
    var arrangesInputs: Bool { rotary != nil || keyValueHeads != heads || queryNorm != nil }

    /// Width of the QKV projection: C queries plus kv_heads heads of keys and of values.
    var projectedWidth: Int { qkv.outputSize }

    /// cache.qkv [rows, 3C], the core's input, from x [rows, C]: the projection, then (llama)
    /// queries and keys normalised and rotated at their positions and each key/value head
    /// repeated for its group of query heads.
    public func projectInputs(_ x: UnsafePointer<T>, rows: Int, positions: RowPositions, cache: Cache) {
        let width = projection.inputSize
        cache.qkv.resize(rows: rows, columns: 3 * width)
        let input = keptOperand(x, count: rows * width, rounding: cache.roundedInput)
        guard arrangesInputs else { return qkv.forward(input, rows: rows, into: cache.qkv.pointer, addingBias: true) }
        cache.projected.resize(rows: rows, columns: projectedWidth)
        qkv.forward(input, rows: rows, into: cache.projected.pointer, addingBias: true)
        let headSize = width / heads, keyWidth = keyValueHeads * headSize, group = heads / keyValueHeads
        cache.queryReciprocals.resize(rows: rows, columns: queryNorm?.width == width ? 1 : heads)
        cache.keyReciprocals.resize(rows: rows, columns: keyNorm?.width == keyWidth ? 1 : keyValueHeads)
        cache.rowScratch.resize(rows: 1, columns: width)
        let keys = cache.rowScratch.pointer
        for row in 0..<rows {
            let source = cache.projected.row(row), destination = cache.qkv.row(row), position = positions.position(ofRow: row)
            normalize(source, into: destination, heads: heads, norm: queryNorm, reciprocals: cache.queryReciprocals.row(row))
            rotary?.rotate(destination, heads: heads, position: position)
            normalize(source + width, into: keys, heads: keyValueHeads, norm: keyNorm, reciprocals: cache.keyReciprocals.row(row))
            rotary?.rotate(keys, heads: keyValueHeads, position: position)
            for head in 0..<heads {
                let shared = (head / group) * headSize
                (destination + width + head * headSize).update(from: keys + shared, count: headSize)
                (destination + 2 * width + head * headSize).update(from: source + width + keyWidth + shared, count: headSize)
            }
        }
    }

    /// Adjoint of `projectInputs`, from cache.dQKV [rows, 3C]: accumulates into dx and the
    /// projection's and norms' gradients.
    func projectInputsBackward(_ x: UnsafePointer<T>, rows: Int, positions: RowPositions, dx: UnsafeMutablePointer<T>, cache: Cache) {
        let input = kept(x, cache.roundedInput)
        guard arrangesInputs else { return qkv.backward(input, .values(cache.dQKV.pointer), rows: rows, dx: dx, dxBeta: 1) }
        let width = projection.inputSize, headSize = width / heads, keyWidth = keyValueHeads * headSize, group = heads / keyValueHeads
        cache.dProjected.resize(rows: rows, columns: projectedWidth, zero: true)
        let scratch = cache.rowScratch.pointer
        for row in 0..<rows {
            let source = cache.projected.row(row), gradient = cache.dQKV.row(row), dSource = cache.dProjected.row(row)
            let position = positions.position(ofRow: row)
            scratch.update(from: gradient, count: width)
            rotary?.rotate(scratch, heads: heads, position: position, inverse: true)
            normalizeBackward(source, scratch, into: dSource, heads: heads, norm: queryNorm, reciprocals: cache.queryReciprocals.row(row))
            // A shared key/value head's gradient is the sum over its group of query heads.
            scratch.update(repeating: 0, count: keyWidth)
            for head in 0..<heads {
                let shared = (head / group) * headSize
                Kernels.add(gradient + width + head * headSize, into: scratch + shared, count: headSize)
                Kernels.add(gradient + 2 * width + head * headSize, into: dSource + width + keyWidth + shared, count: headSize)
            }
            rotary?.rotate(scratch, heads: keyValueHeads, position: position, inverse: true)
            normalizeBackward(source + width, scratch, into: dSource + width, heads: keyValueHeads, norm: keyNorm,
                              reciprocals: cache.keyReciprocals.row(row))
        }
        qkv.backward(input, .values(cache.dProjected.pointer), rows: rows, dx: dx, dxBeta: 1)
    }

    /// `heads` heads of hd values from `source` to `destination`: RMS-normalised per head or as
    /// a whole (the norm's width says which), or copied.
    private func normalize(_ source: UnsafePointer<T>, into destination: UnsafeMutablePointer<T>, heads count: Int, norm: RMSNorm<T>?,
                           reciprocals: UnsafeMutablePointer<T>) {
        let headSize = projection.inputSize / heads
        guard let norm else { return destination.update(from: source, count: count * headSize) }
        let rows = norm.width == headSize ? count : 1
        norm.forward(source, stride: norm.width, rows: rows, into: destination, stride: norm.width, reciprocals: reciprocals)
    }

    /// Adjoint of `normalize`: dSource += the norm's adjoint of `gradient` (or `gradient`).
    private func normalizeBackward(_ source: UnsafePointer<T>, _ gradient: UnsafePointer<T>, into dSource: UnsafeMutablePointer<T>,
                                   heads count: Int, norm: RMSNorm<T>?, reciprocals: UnsafePointer<T>) {
        let headSize = projection.inputSize / heads
        guard let norm else { return Kernels.add(gradient, into: dSource, count: count * headSize) }
        let rows = norm.width == headSize ? count : 1
        // The gradient rows sit at the norm's stride in both the scratch and dSource.
        norm.backward(source, gradient, stride: norm.width, rows: rows, dx: dSource, stride: norm.width, reciprocals: reciprocals)
    }
}
