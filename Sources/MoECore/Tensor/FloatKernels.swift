#if canImport(Glibc)
import Glibc
#endif
import CVectorMath

// Float fast paths of the element-wise kernels in Kernels.swift.
//
// Why they exist: in a function generic over T, `SIMD16<T> * SIMD16<T>` resolves (at type-check
// time) to the generic SIMD extension that loops over lanes; specialising T = Float later does
// not change that choice, and the loop stays scalar. Written against the concrete SIMD16<Float>,
// the same expressions become vector instructions (8-25x faster here). The generic versions stay
// the reference: they run in Double for the gradient checks, and a test holds these to them.
enum FloatKernels {
    typealias Vector = SIMD16<Float>

    @inline(__always) static func load(_ source: UnsafePointer<Float>) -> Vector {
        UnsafeRawPointer(source).loadUnaligned(as: Vector.self)
    }

    @inline(__always) static func store(_ vector: Vector, _ destination: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(destination).storeBytes(of: vector, as: Vector.self)
    }

    /// The first `lanes` values (the rest zero): a plain load for a full vector.
    @inline(__always) static func load(_ source: UnsafePointer<Float>, lanes: Int) -> Vector {
        lanes == 16 ? load(source) : loadVector(source, lanes: lanes)
    }

    /// Stores the first `lanes` values: a plain store for a full vector.
    @inline(__always) static func store(_ vector: Vector, _ destination: UnsafeMutablePointer<Float>, lanes: Int) {
        if lanes == 16 { store(vector, destination) } else { storeVector(vector, destination, lanes: lanes) }
    }

    /// Runs `body` on full 16-lane vectors; the tail goes through a zero-padded vector.
    @inline(__always) static func forEachVector(count: Int, _ body: (Int, Int) -> Void) {
        var index = 0
        while index + 16 <= count { body(index, 16); index += 16 }
        if index < count { body(index, count - index) }
    }

    /// GELU (tanh form) of 16 lanes (CVectorMath: one exponential, one division, fused
    /// multiply-adds).
    @inline(__always) static func gelu(_ x: Vector) -> Vector { swiftmoe_gelu16(x, Float(Kernels.geluScale), Float(Kernels.geluCubic)) }

    /// GELU'(x) of 16 lanes.
    @inline(__always) static func geluDerivative(_ x: Vector) -> Vector {
        swiftmoe_gelu_derivative16(x, Float(Kernels.geluScale), Float(Kernels.geluCubic))
    }

    static func geluForward(_ input: UnsafePointer<Float>, _ output: UnsafeMutablePointer<Float>, count: Int) {
        forEachVector(count: count) { index, lanes in
            let x = load(input + index, lanes: lanes)
            store(gelu(x), output + index, lanes: lanes)
        }
    }

    static func geluBackward(_ input: UnsafePointer<Float>, _ dOutput: UnsafePointer<Float>,
                             _ dInput: UnsafeMutablePointer<Float>, count: Int) {
        forEachVector(count: count) { index, lanes in
            let x = load(input + index, lanes: lanes)
            let dy = load(dOutput + index, lanes: lanes)
            let dx = dy * geluDerivative(x)
            store(dx, dInput + index, lanes: lanes)
        }
    }

    /// Stores `values` and, where `rounded` is given, their bf16 rounding at the same index.
    @inline(__always) static func store(_ values: Vector, _ destination: UnsafeMutablePointer<Float>?,
                                        rounded: UnsafeMutablePointer<BFloat16>?, rounding: VectorRounding, lanes: Int) {
        if let destination { store(values, destination, lanes: lanes) }
        if let rounded { storeRounded(values, rounded, rounding: rounding, lanes: lanes) }
    }

    /// Stores the bf16 rounding of the first `lanes` values.
    @inline(__always) static func storeRounded(_ values: Vector, _ rounded: UnsafeMutablePointer<BFloat16>, rounding: VectorRounding,
                                               lanes: Int) {
        if lanes == 16 {
            rounding.store(unsafeBitCast(values, to: SIMD16<UInt32>.self), into: rounded)
        } else {
            for lane in 0..<lanes { rounded[lane] = BFloat16(values[lane]) }
        }
    }

    /// The FFN hidden layer's forward element-wise work in one pass over [rows, columns]:
    /// h += bias (h holds x W1), a = GELU(h), and a's bf16 copy where `rounded` is given (a
    /// itself only where `activation` is: a product that reads only the copy needs no fp32 a).
    /// The same arithmetic as addBias, then geluForward, then BFloat16.round.
    static func biasGELU(_ h: UnsafeMutablePointer<Float>, bias: UnsafePointer<Float>, rows: Int, columns: Int,
                         activation: UnsafeMutablePointer<Float>?, rounded: UnsafeMutablePointer<BFloat16>?) {
        precondition(activation != nil || rounded != nil, "biasGELU writes neither a nor its copy")
        let rounding = VectorRounding()
        BLASInfo.splitElementwise(rows, grain: 1, elementsPerUnit: columns) { first, end in
            for row in first..<end {
                let offset = row * columns
                forEachVector(count: columns) { index, lanes in
                    let at = offset + index
                    let pre = load(h + at, lanes: lanes) + load(bias + index, lanes: lanes)
                    store(pre, h + at, lanes: lanes)
                    store(gelu(pre), activation.map { $0 + at }, rounded: rounded.map { $0 + at }, rounding: rounding, lanes: lanes)
                }
            }
        }
    }

    /// The FFN hidden layer's backward element-wise work in one pass over [rows, columns]:
    /// d = d GELU'(h) in place (unless `keepsFloat` is false: d is left as it was), biasGradient
    /// += Σ_rows d, and d's bf16 copy where `rounded` is given. The same arithmetic, in the same
    /// order, as geluBackward, addColumnSums, BFloat16.round.
    static func geluBackwardBias(_ h: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, rows: Int, columns: Int,
                                 biasGradient: UnsafeMutablePointer<Float>, rounded: UnsafeMutablePointer<BFloat16>?,
                                 keepsFloat: Bool = true) {
        precondition(keepsFloat || rounded != nil, "geluBackwardBias keeps neither dPre nor its copy")
        let rounding = VectorRounding(), output = keepsFloat ? d : nil
        forEachVectorColumnSplit(rows: rows, columns: columns) { at, index, lanes in
            let x = load(h + at, lanes: lanes)
            let dy = load(d + at, lanes: lanes)
            let dx = dy * geluDerivative(x)
            store(dx, output.map { $0 + at }, rounded: rounded.map { $0 + at }, rounding: rounding, lanes: lanes)
            store(load(biasGradient + index, lanes: lanes) + dx, biasGradient + index, lanes: lanes)
        }
    }

    /// A linear layer's output gradient in one pass over [rows, columns]: biasGradient += Σ_rows
    /// d and d's bf16 copy. The same arithmetic, in the same order, as addColumnSums, then
    /// BFloat16.round.
    static func biasGradientRounding(_ d: UnsafePointer<Float>, rows: Int, columns: Int,
                                     biasGradient: UnsafeMutablePointer<Float>, rounded: UnsafeMutablePointer<BFloat16>) {
        let rounding = VectorRounding()
        forEachVectorColumnSplit(rows: rows, columns: columns) { at, index, lanes in
            let dy = load(d + at, lanes: lanes)
            storeRounded(dy, rounded + at, rounding: rounding, lanes: lanes)
            store(load(biasGradient + index, lanes: lanes) + dy, biasGradient + index, lanes: lanes)
        }
    }

    /// `body(element, column, lanes)` over [rows, columns], row after row, 16 columns at a
    /// time; split by columns over one process's pinned threads, so that sums down a column
    /// still run over the rows in order.
    @inline(__always) static func forEachVectorColumnSplit(rows: Int, columns: Int, _ body: (Int, Int, Int) -> Void) {
        BLASInfo.splitElementwise(columns, elementsPerUnit: rows) { firstColumn, endColumn in
            for row in 0..<rows {
                forEachVector(count: endColumn - firstColumn) { part, lanes in
                    body(row * columns + firstColumn + part, firstColumn + part, lanes)
                }
            }
        }
    }

    @inline(__always) static func sigmoid(_ x: Vector) -> Vector { 1 / (1 + Float.exp(-x)) }

    /// SwiGLU's forward element-wise work in one pass: pre [rows, 2H] holds x [W_gate | W_up];
    /// a = silu(g) u [rows, H], and a's bf16 copy where `rounded` is given.
    static func swiGLU(_ pre: UnsafePointer<Float>, rows: Int, hidden: Int, activation: UnsafeMutablePointer<Float>?,
                       rounded: UnsafeMutablePointer<BFloat16>?) {
        precondition(activation != nil || rounded != nil, "swiGLU writes neither a nor its copy")
        let rounding = VectorRounding()
        for row in 0..<rows {
            let gate = pre + row * 2 * hidden, up = gate + hidden, offset = row * hidden
            forEachVector(count: hidden) { index, lanes in
                let g = load(gate + index, lanes: lanes), u = load(up + index, lanes: lanes)
                store(g * sigmoid(g) * u, activation.map { $0 + offset + index }, rounded: rounded.map { $0 + offset + index },
                      rounding: rounding, lanes: lanes)
            }
        }
    }

    /// SwiGLU's backward element-wise work in one pass: from dA [rows, H] to dPre [rows, 2H]
    /// (dg = dA u s (1 + g (1 - s)), du = dA g s, s = sigmoid(g)) and dPre's bf16 copy where
    /// `rounded` is given.
    static func swiGLUBackward(_ pre: UnsafePointer<Float>, _ dActivation: UnsafePointer<Float>, rows: Int, hidden: Int,
                               dPre: UnsafeMutablePointer<Float>?, rounded: UnsafeMutablePointer<BFloat16>?) {
        precondition(dPre != nil || rounded != nil, "swiGLUBackward writes neither dPre nor its copy")
        let rounding = VectorRounding()
        for row in 0..<rows {
            let at = row * 2 * hidden, gate = pre + at, up = gate + hidden, dA = dActivation + row * hidden
            forEachVector(count: hidden) { index, lanes in
                let g = load(gate + index, lanes: lanes), u = load(up + index, lanes: lanes), d = load(dA + index, lanes: lanes)
                let s = sigmoid(g)
                store(d * u * (s * (1 + g * (1 - s))), dPre.map { $0 + at + index }, rounded: rounded.map { $0 + at + index },
                      rounding: rounding, lanes: lanes)
                store(d * g * s, dPre.map { $0 + at + hidden + index }, rounded: rounded.map { $0 + at + hidden + index },
                      rounding: rounding, lanes: lanes)
            }
        }
    }

    /// Σ of `count` values in 16 lane sums (then the lanes' sum): a fixed order, vectorised.
    @inline(__always) static func sum(_ x: UnsafePointer<Float>, count: Int, _ term: (Vector, Int) -> Vector) -> Float {
        var sums = Vector(repeating: 0)
        forEachVector(count: count) { index, lanes in
            let v = load(x + index, lanes: lanes)
            var t = term(v, index)
            if lanes < 16 { for lane in lanes..<16 { t[lane] = 0 } }
            sums += t
        }
        return sums.sum()
    }

    /// Σ x y in 16 lane sums.
    static func dot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, count: Int) -> Float {
        var sums = Vector(repeating: 0)
        var index = 0
        while index + 16 <= count {
            sums += load(x + index) * load(y + index)
            index += 16
        }
        if index < count { sums += loadVector(x + index, lanes: count - index) * loadVector(y + index, lanes: count - index) }
        return sums.sum()
    }

    /// dRow = p (dRow - <p, dRow>) in place, the dot in 16 lanes.
    static func softmaxBackwardRow(probabilities p: UnsafePointer<Float>, _ dRow: UnsafeMutablePointer<Float>, count: Int) {
        let dot = self.dot(p, UnsafePointer(dRow), count: count)
        forEachVector(count: count) { index, lanes in
            if lanes == 16 { store(load(p + index) * (load(dRow + index) - dot), dRow + index) } else {
                for i in index..<index + lanes { dRow[i] = p[i] * (dRow[i] - dot) }
            }
        }
    }

    /// Layer norm forward over rows of `width`: y = (x - mean) rstd gain + bias; keeps mean and
    /// rstd per row.
    static func layerNormForward(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int,
                                 gain: UnsafePointer<Float>, bias: UnsafePointer<Float>, epsilon: Float,
                                 means: UnsafeMutablePointer<Float>, reciprocals: UnsafeMutablePointer<Float>) {
        let inverseWidth = 1 / Float(width)
        for row in 0..<rows {
            let input = x + row * width, output = y + row * width
            let mean = sum(input, count: width) { v, _ in v } * inverseWidth
            let squares = sum(input, count: width) { v, _ in (v - mean) * (v - mean) }
            let reciprocal = 1 / (squares * inverseWidth + epsilon).squareRoot()
            forEachVector(count: width) { index, lanes in
                    let v = load(input + index, lanes: lanes)
                let g = load(gain + index, lanes: lanes)
                let b = load(bias + index, lanes: lanes)
                let out = (v - mean) * reciprocal * g + b
                store(out, output + index, lanes: lanes)
            }
            means[row] = mean
            reciprocals[row] = reciprocal
        }
    }

    /// Layer norm backward: dgain += Σ dy x̂, dbias += Σ dy, dx += rstd (dŷ - mean(dŷ) - x̂ mean(dŷ x̂)), dŷ = dy gain.
    static func layerNormBackward(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
                                  rows: Int, width: Int, gain: UnsafePointer<Float>, gainGradient: UnsafeMutablePointer<Float>,
                                  biasGradient: UnsafeMutablePointer<Float>, means: UnsafePointer<Float>, reciprocals: UnsafePointer<Float>) {
        let inverseWidth = 1 / Float(width)
        for row in 0..<rows {
            let input = x + row * width, dOut = dy + row * width, dIn = dx + row * width
            let mean = means[row], reciprocal = reciprocals[row]
            var dNormSums = Vector(repeating: 0), dNormTimesNormSums = Vector(repeating: 0)
            forEachVector(count: width) { index, lanes in
                    let v = load(input + index, lanes: lanes)
                let d = load(dOut + index, lanes: lanes)
                let g = load(gain + index, lanes: lanes)
                let normalized = (v - mean) * reciprocal, dNorm = d * g   // padded lanes: d = 0, so dNorm = 0
                dNormSums += dNorm
                dNormTimesNormSums += dNorm * normalized
                let gains = load(gainGradient + index, lanes: lanes) + d * normalized
                let biases = load(biasGradient + index, lanes: lanes) + d
                store(gains, gainGradient + index, lanes: lanes)
                store(biases, biasGradient + index, lanes: lanes)
            }
            let meanDNorm = dNormSums.sum() * inverseWidth, meanDNormTimesNorm = dNormTimesNormSums.sum() * inverseWidth
            forEachVector(count: width) { index, lanes in
                    let v = load(input + index, lanes: lanes)
                let d = load(dOut + index, lanes: lanes)
                let g = load(gain + index, lanes: lanes)
                let normalized = (v - mean) * reciprocal
                let out = load(dIn + index, lanes: lanes)
                    + reciprocal * (d * g - meanDNorm - normalized * meanDNormTimesNorm)
                store(out, dIn + index, lanes: lanes)
            }
        }
    }

    /// One row of RMS norm: y = x r gain, r = 1 / sqrt(mean(x²) + eps), the squares summed in
    /// 16 lanes; returns r.
    static func rmsNormForward(_ input: UnsafePointer<Float>, _ output: UnsafeMutablePointer<Float>, width: Int,
                               gain: UnsafePointer<Float>, epsilon: Float) -> Float {
        let squares = sum(input, count: width) { v, _ in v * v }
        let reciprocal = 1 / (squares / Float(width) + epsilon).squareRoot()
        forEachVector(count: width) { index, lanes in
            store(load(input + index, lanes: lanes) * reciprocal * load(gain + index, lanes: lanes), output + index, lanes: lanes)
        }
        return reciprocal
    }

    /// One row of RMS norm's adjoint: dgain += dy x̂, dx += r (dy gain - x̂ mean(dy gain x̂)).
    static func rmsNormBackward(_ input: UnsafePointer<Float>, _ dOut: UnsafePointer<Float>, _ dIn: UnsafeMutablePointer<Float>,
                                width: Int, gain: UnsafePointer<Float>, gainGradient: UnsafeMutablePointer<Float>, reciprocal: Float) {
        var products = Vector(repeating: 0)
        forEachVector(count: width) { index, lanes in
            let normalized = load(input + index, lanes: lanes) * reciprocal, d = load(dOut + index, lanes: lanes)
            products += d * load(gain + index, lanes: lanes) * normalized   // padded lanes: d = 0
            store(load(gainGradient + index, lanes: lanes) + d * normalized, gainGradient + index, lanes: lanes)
        }
        let meanProduct = products.sum() / Float(width)
        forEachVector(count: width) { index, lanes in
            let normalized = load(input + index, lanes: lanes) * reciprocal
            let d = load(dOut + index, lanes: lanes) * load(gain + index, lanes: lanes)
            store(load(dIn + index, lanes: lanes) + reciprocal * (d - normalized * meanProduct), dIn + index, lanes: lanes)
        }
    }

    /// row[j] = exp(row[j] - shift) for j < count; returns their sum.
    static func expShifted(_ row: UnsafeMutablePointer<Float>, count: Int, shift: Float) -> Float {
        var sumVector = Vector(repeating: 0)
        forEachVector(count: count) { index, lanes in
            if lanes == 16 {
                let e = Float.exp(load(row + index) - shift)
                sumVector += e
                store(e, row + index)
            } else {
                let e = Float.exp(loadVector(row + index, lanes: lanes, padding: -.infinity) - shift)
                sumVector += e   // padded lanes are exp(-inf) = 0
                storeVector(e, row + index, lanes: lanes)
            }
        }
        return sumVector.sum()
    }

    /// One causal attention row of `length` values (a multiple of 16) in place: the first
    /// `visible` become their softmax, the rest zeros, and with `rounded` the row's bf16 copy is
    /// written. Bit for bit `softmaxRowParts` on the visible values, then zeros, then
    /// `BFloat16.round` (the same 16-lane blocks from the row's start, the same -inf padding, whose
    /// clamped exponentials the sum includes as before), but each block a whole-vector operation
    /// under a lane mask instead of a scalar tail, zeroing and rounding pass per row (the rows of
    /// a causal T x T matrix all end mid-block but one in 16).
    static func causalSoftmaxRow(_ row: UnsafeMutablePointer<Float>, visible: Int, length: Int,
                                 rounded: UnsafeMutablePointer<BFloat16>?, rounding: VectorRounding) {
        precondition(length % 16 == 0 && (1...length).contains(visible), "causal row: visible \(visible) of \(length)")
        let blocks = (visible + 15) / 16, end = Int32(visible), zero = Vector(repeating: 0)
        var maxVector = Vector(repeating: -.infinity)
        for block in 0..<blocks {
            let index = block * 16, v = swiftmoe_keep_below16(load(row + index), Int32(index), end, -.infinity)
            maxVector = maxVector.replacing(with: v, where: v .> maxVector)   // pointwiseMax is scalar
        }
        let maximum = maxVector.max()
        var sumVector = zero
        for block in 0..<blocks {
            let index = block * 16
            let e = Float.exp(swiftmoe_keep_below16(load(row + index), Int32(index), end, -.infinity) - maximum)
            sumVector += e
            store(swiftmoe_keep_below16(e, Int32(index), end, 0), row + index)
        }
        let inverse = 1 / sumVector.sum()
        for block in 0..<(length / 16) {
            let index = block * 16, value = block < blocks ? load(row + index) * inverse : zero
            store(value, row + index)
            if let rounded { rounding.store(unsafeBitCast(value, to: SIMD16<UInt32>.self), into: rounded + index) }
        }
    }

    /// The adjoint of `causalSoftmaxRow` on one row: dRow = p (dRow - <p, dRow>) over the first
    /// `visible` values, zeros after them, and with `rounded` the row's bf16 copy. Bit for bit
    /// `softmaxBackwardRow` on the visible values, then zeros, then `BFloat16.round` (the dot's
    /// padded lanes are 0 x 0 as before), in whole-vector masked operations.
    static func causalSoftmaxBackwardRow(probabilities p: UnsafePointer<Float>, _ dRow: UnsafeMutablePointer<Float>, visible: Int, length: Int,
                                         rounded: UnsafeMutablePointer<BFloat16>?, rounding: VectorRounding) {
        precondition(length % 16 == 0 && (1...length).contains(visible), "causal row: visible \(visible) of \(length)")
        let blocks = (visible + 15) / 16, end = Int32(visible), zero = Vector(repeating: 0)
        var sums = zero
        for block in 0..<blocks {
            let index = block * 16
            sums += swiftmoe_keep_below16(load(p + index), Int32(index), end, 0) * swiftmoe_keep_below16(load(dRow + index), Int32(index), end, 0)
        }
        let dot = sums.sum()
        for block in 0..<(length / 16) {
            let index = block * 16
            let value = block < blocks ? swiftmoe_keep_below16(load(p + index) * (load(dRow + index) - dot), Int32(index), end, 0) : zero
            store(value, dRow + index)
            if let rounded { rounding.store(unsafeBitCast(value, to: SIMD16<UInt32>.self), into: rounded + index) }
        }
    }

    static func softmaxRow(_ row: UnsafeMutablePointer<Float>, count: Int) -> Float {
        let (maximum, sum) = softmaxRowParts(row, count: count)
        return Float(Glibc.log(Double(sum))) + maximum
    }

    /// The softmax of `softmaxRow` in place, without the logarithm: the row's maximum and its sum
    /// of exp(x - maximum).
    @discardableResult
    static func softmaxRowParts(_ row: UnsafeMutablePointer<Float>, count: Int) -> (maximum: Float, sum: Float) {
        var maxVector = Vector(repeating: -.infinity)
        forEachVector(count: count) { index, lanes in
            let v = lanes == 16 ? load(row + index) : loadVector(row + index, lanes: lanes, padding: -.infinity)
            maxVector = maxVector.replacing(with: v, where: v .> maxVector)   // pointwiseMax is scalar
        }
        let maximum = maxVector.max()
        let sum = expShifted(row, count: count, shift: maximum)
        let inverse = 1 / sum
        forEachVector(count: count) { index, lanes in
            if lanes == 16 { store(load(row + index) * inverse, row + index) } else {
                for i in index..<index + lanes { row[i] *= inverse }
            }
        }
        return (maximum, sum)
    }

    /// Softmax of each row of `logits` [rows, count], count below 16 (a router's experts), into
    /// `probabilities` [rows, count], with each row's log-sum-exp. Bit for bit `softmaxRow` on a
    /// copy of the row (the same -inf padding, exponentials and sums), but each row one masked
    /// whole vector instead of a tail loop of scalars: a 16-lane load reaches into the next rows
    /// (all rows but the last few, whose loads would leave the buffer).
    static func narrowSoftmaxRows(_ logits: UnsafePointer<Float>, into probabilities: UnsafeMutablePointer<Float>, rows: Int,
                                  count: Int, logSumExp: UnsafeMutablePointer<Float>) {
        precondition(count > 0 && count < 16, "narrow rows: \(count) values")
        let padding = Vector(repeating: -.infinity), end = Int32(count)
        for row in 0..<rows {
            let input = logits + row * count
            let v = row * count + 16 <= rows * count ? swiftmoe_keep_below16(load(input), 0, end, -.infinity)
                : loadVector(input, lanes: count, padding: -.infinity)
            let maximum = padding.replacing(with: v, where: v .> padding).max()
            let e = Float.exp(v - maximum)   // padded lanes: exp(-inf), clamped, summed as in softmaxRowParts
            let sum = e.sum(), inverse = 1 / sum
            storeVector(e * inverse, probabilities + row * count, lanes: count)
            logSumExp[row] = Float(Glibc.log(Double(sum))) + maximum
        }
    }

    /// dLogits[s] += p_s ⊙ (g - <p_s, g>) for every row s of `probabilities` [rows, count], count
    /// below 16, with one gradient g [count] for all rows (the load-balancing loss's): bit for bit
    /// `softmaxBackwardRow` on a copy of g, then `Kernels.add`, each row as whole vectors.
    static func narrowSoftmaxBackwardAdding(probabilities: UnsafePointer<Float>, sharedGradient g: UnsafePointer<Float>, rows: Int,
                                            count: Int, into dLogits: UnsafeMutablePointer<Float>) {
        precondition(count > 0 && count < 16, "narrow rows: \(count) values")
        let gradient = loadVector(g, lanes: count), end = Int32(count), zero = Vector(repeating: 0)
        for row in 0..<rows {
            let p = probabilities + row * count, dl = dLogits + row * count
            let whole = row * count + 16 <= rows * count   // a 16-lane load stays in the buffers
            let probability = whole ? swiftmoe_keep_below16(load(p), 0, end, 0) : loadVector(p, lanes: count)
            let dot = (zero + probability * gradient).sum()
            let sums = (whole ? load(UnsafePointer(dl)) : loadVector(dl, lanes: count)) + probability * (gradient - dot)
            storeVector(sums, dl, lanes: count)
        }
    }

    static func sumOfSquares(_ x: UnsafePointer<Float>, count: Int) -> Double {
        var total = 0.0
        var index = 0
        // Float vector partial sums over blocks of 4096, accumulated in Double.
        while index < count {
            let end = min(count, index + 4096)
            var partial = Vector(repeating: 0)
            while index + 16 <= end { let v = load(x + index); partial += v * v; index += 16 }
            var tail: Float = 0
            while index < end { tail += x[index] * x[index]; index += 1 }
            total += Double(partial.sum()) + Double(tail)
        }
        return total
    }

    /// AdamW on the whole 16-lane blocks of [count]; returns how many elements it updated (the
    /// caller finishes the tail with the reference loop).
    /// With `rounded`, the updated values' bf16 copy is written in the same pass; with
    /// `clearing`, the gradients are zeroed as they are read (the next step's zeroing, without a
    /// pass of its own over memory).
    static func adamWBlocks(values: UnsafeMutablePointer<Float>, rounded: UnsafeMutablePointer<BFloat16>?, gradients: UnsafeMutablePointer<Float>,
                            first: UnsafeMutablePointer<Float>, second: UnsafeMutablePointer<Float>, count: Int,
                            beta1: Float, beta2: Float, stepSize: Float, epsilon: Float, decay: Float, gradientScale: Float,
                            clearing: Bool) -> Int {
        let oneMinusBeta1 = 1 - beta1, oneMinusBeta2 = 1 - beta2
        /// The updated values of block `index` (moments stored).
        @inline(__always) func update(_ index: Int) -> Vector {
            let g = load(gradients + index) * gradientScale
            if clearing { store(Vector(repeating: 0), gradients + index) }
            let m = load(first + index) * beta1 + g * oneMinusBeta1
            let v = load(second + index) * beta2 + g * g * oneMinusBeta2
            store(m, first + index)
            store(v, second + index)
            let updated = load(values + index) * decay - stepSize * m / (swiftmoe_sqrt16(v) + epsilon)
            store(updated, values + index)
            return updated
        }
        var index = 0
        // Two loops rather than a test per block: the branch stays out of the hot loop.
        if let rounded {
            let rounding = VectorRounding()
            while index + 16 <= count {
                rounding.store(unsafeBitCast(update(index), to: SIMD16<UInt32>.self), into: rounded + index)
                index += 16
            }
        } else {
            while index + 16 <= count { _ = update(index); index += 16 }
        }
        return index
    }
}

/// Reinterprets a generic pointer as Float when T is Float (a no-op the specialiser folds away).
@inline(__always) func asFloat<T>(_ pointer: UnsafePointer<T>) -> UnsafePointer<Float> {
    UnsafeRawPointer(pointer).assumingMemoryBound(to: Float.self)
}

@inline(__always) func asFloat<T>(_ pointer: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Float> {
    UnsafeMutableRawPointer(pointer).assumingMemoryBound(to: Float.self)
}
