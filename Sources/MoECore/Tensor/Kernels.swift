#if canImport(Glibc)
import Glibc
#endif

// Element-wise kernels over unsafe pointers, 16 lanes at a time (SIMD16), with no libm call per
// element. Dimension letters: N rows (tokens), C columns (channels), V vocabulary.

@inline(__always)
func loadVector<T: Scalar>(_ source: UnsafePointer<T>, lanes: Int, padding: T = 0) -> SIMD16<T> {
    if lanes == 16 { return UnsafeRawPointer(source).loadUnaligned(as: SIMD16<T>.self) }
    var vector = SIMD16<T>(repeating: padding)
    for lane in 0..<lanes { vector[lane] = source[lane] }
    return vector
}

@inline(__always)
func storeVector<T: Scalar>(_ vector: SIMD16<T>, _ destination: UnsafeMutablePointer<T>, lanes: Int) {
    if lanes == 16 {
        UnsafeMutableRawPointer(destination).storeBytes(of: vector, as: SIMD16<T>.self)
    } else {
        for lane in 0..<lanes { destination[lane] = vector[lane] }
    }
}

/// tanh(u) = 1 - 2 / (exp(2u) + 1); exact limits ±1 because exp clamps instead of overflowing.
@inline(__always)
func tanhVector<T: Scalar>(_ u: SIMD16<T>) -> SIMD16<T> {
    1 - 2 / (T.exp(u + u) + 1)
}

public enum Kernels {
    static let geluScale = 0.797_884_560_802_865_4   // sqrt(2 / pi)
    static let geluCubic = 0.044_715

    /// GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    public static func geluForward<T: Scalar>(_ input: UnsafePointer<T>, _ output: UnsafeMutablePointer<T>, count: Int) {
        if T.self == Float.self { return FloatKernels.geluForward(asFloat(input), asFloat(output), count: count) }
        let scale = T(geluScale), cubic = T(geluCubic)
        var index = 0
        while index < count {
            let lanes = min(16, count - index)
            let x = loadVector(input + index, lanes: lanes)
            let x3: SIMD16<T> = x * x * x
            let u: SIMD16<T> = scale * (x + cubic * x3)
            let half: SIMD16<T> = 0.5 * x
            storeVector(half * (1 + tanhVector(u)), output + index, lanes: lanes)
            index += 16
        }
    }

    /// y = 1 / (1 + exp(-x)), element-wise (in Double for Double).
    public static func sigmoid<T: Scalar>(_ x: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, count: Int) {
        for index in 0..<count { y[index] = T(1 / (1 + Glibc.exp(-Double(x[index])))) }
    }

    /// SwiGLU: a [rows, H] = silu(g) u from pre [rows, 2H] = [g | u] (the reference of
    /// `FloatKernels.swiGLU`).
    public static func swiGLUForward<T: Scalar>(_ pre: UnsafePointer<T>, rows: Int, hidden: Int, activation: UnsafeMutablePointer<T>) {
        if T.self == Float.self {
            return FloatKernels.swiGLU(asFloat(pre), rows: rows, hidden: hidden, activation: asFloat(activation), rounded: nil)
        }
        for row in 0..<rows {
            let gate = pre + row * 2 * hidden, up = gate + hidden, output = activation + row * hidden
            for j in 0..<hidden { output[j] = gate[j] / (1 + T(Glibc.exp(Double(-gate[j])))) * up[j] }
        }
    }

    /// Adjoint of `swiGLUForward`: dPre [rows, 2H] from dA [rows, H] (written, not added).
    public static func swiGLUBackward<T: Scalar>(_ pre: UnsafePointer<T>, _ dActivation: UnsafePointer<T>, rows: Int, hidden: Int,
                                                 dPre: UnsafeMutablePointer<T>) {
        if T.self == Float.self {
            return FloatKernels.swiGLUBackward(asFloat(pre), asFloat(dActivation), rows: rows, hidden: hidden, dPre: asFloat(dPre),
                                               rounded: nil)
        }
        for row in 0..<rows {
            let gate = pre + row * 2 * hidden, up = gate + hidden, dA = dActivation + row * hidden
            let dGate = dPre + row * 2 * hidden, dUp = dGate + hidden
            for j in 0..<hidden {
                let s = 1 / (1 + T(Glibc.exp(Double(-gate[j]))))
                dGate[j] = dA[j] * up[j] * s * (1 + gate[j] * (1 - s))
                dUp[j] = dA[j] * gate[j] * s
            }
        }
    }

    /// dInput = dOutput * GELU'(input), written over `dInput` (which may alias `dOutput`).
    public static func geluBackward<T: Scalar>(_ input: UnsafePointer<T>, _ dOutput: UnsafePointer<T>,
                                               _ dInput: UnsafeMutablePointer<T>, count: Int) {
        if T.self == Float.self { return FloatKernels.geluBackward(asFloat(input), asFloat(dOutput), asFloat(dInput), count: count) }
        let scale = T(geluScale), cubic = T(geluCubic)
        var index = 0
        while index < count {
            let lanes = min(16, count - index)
            let x = loadVector(input + index, lanes: lanes)
            let dy = loadVector(dOutput + index, lanes: lanes)
            let x2 = x * x
            let x3: SIMD16<T> = x2 * x
            let tanhU = tanhVector(scale * (x + cubic * x3))
            let half = SIMD16<T>(repeating: 0.5), one = SIMD16<T>(repeating: 1)
            let slope: SIMD16<T> = scale * (one + (3 * cubic) * x2)
            let sech2: SIMD16<T> = one - tanhU * tanhU
            let derivative: SIMD16<T> = half * (one + tanhU) + half * x * sech2 * slope
            storeVector(dy * derivative, dInput + index, lanes: lanes)
            index += 16
        }
    }

    /// row[j] = exp(row[j] - shift) for j < count, in place; returns their sum (the online
    /// softmax of tiled attention).
    public static func expShifted<T: Scalar>(_ row: UnsafeMutablePointer<T>, count: Int, shift: T) -> T {
        if T.self == Float.self { return FloatKernels.expShifted(asFloat(row), count: count, shift: shift as! Float) as! T }
        var sum: T = 0
        var index = 0
        while index < count {
            let lanes = min(16, count - index)
            var e = T.exp(loadVector(row + index, lanes: lanes) - shift)
            if lanes < 16 { for lane in lanes..<16 { e[lane] = 0 } }
            sum += e.sum()
            storeVector(e, row + index, lanes: lanes)
            index += 16
        }
        return sum
    }

    /// In-place softmax of one row of `count` values, for callers that need no logsumexp (its
    /// logarithm was a tenth of attention's softmax).
    public static func softmax<T: Scalar>(row: UnsafeMutablePointer<T>, count: Int) {
        if T.self == Float.self { FloatKernels.softmaxRowParts(asFloat(row), count: count) } else { softmaxRow(row, count: count) }
    }

    /// In-place softmax of one row of `count` values; returns log(sum(exp(x - max))) + max,
    /// the row's logsumexp.
    @discardableResult
    public static func softmaxRow<T: Scalar>(_ row: UnsafeMutablePointer<T>, count: Int) -> T {
        precondition(count > 0)
        if T.self == Float.self { return FloatKernels.softmaxRow(asFloat(row), count: count) as! T }
        var maxVector = SIMD16<T>(repeating: -.infinity)
        var index = 0
        while index < count {
            let lanes = min(16, count - index)
            maxVector = pointwiseMax(maxVector, loadVector(row + index, lanes: lanes, padding: -.infinity))
            index += 16
        }
        let maximum = maxVector.max()
        var sumVector = SIMD16<T>(repeating: 0)
        index = 0
        while index < count {
            let lanes = min(16, count - index)
            var e = T.exp(loadVector(row + index, lanes: lanes) - maximum)
            if lanes < 16 { for lane in lanes..<16 { e[lane] = 0 } }
            sumVector += e
            storeVector(e, row + index, lanes: lanes)
            index += 16
        }
        let sum = sumVector.sum()
        let inverse = 1 / sum
        for i in 0..<count { row[i] *= inverse }
        return T(log(Double(sum))) + maximum
    }

    /// Softmax backward for one row: dLogits = p * (dP - <p, dP>), written over `dRow`.
    public static func softmaxBackwardRow<T: Scalar>(probabilities: UnsafePointer<T>, _ dRow: UnsafeMutablePointer<T>, count: Int) {
        if T.self == Float.self {
            return FloatKernels.softmaxBackwardRow(probabilities: asFloat(probabilities), asFloat(dRow), count: count)
        }
        var dot: T = 0
        for i in 0..<count { dot += probabilities[i] * dRow[i] }
        for i in 0..<count { dRow[i] = probabilities[i] * (dRow[i] - dot) }
    }

    /// Σ over rows of the entropy -Σ_e p log p of each probability row (in Double).
    public static func entropySum<T: Scalar>(_ p: UnsafePointer<T>, rows: Int, columns: Int) -> Double {
        var total = 0.0
        for index in 0..<rows * columns where p[index] > 0 { total -= Double(p[index]) * log(Double(p[index])) }
        return total
    }

    /// y += x (count values).
    @inline(__always)
    public static func add<T: Scalar>(_ x: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, count: Int) {
        for i in 0..<count { y[i] += x[i] }
    }

    /// z = x + y (count values).
    @inline(__always)
    public static func sum<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafePointer<T>, into z: UnsafeMutablePointer<T>, count: Int) {
        for i in 0..<count { z[i] = x[i] + y[i] }
    }

    /// y = alpha * x.
    @inline(__always)
    public static func scale<T: Scalar>(_ alpha: T, _ x: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, count: Int) {
        for i in 0..<count { y[i] = alpha * x[i] }
    }

    /// y += alpha * x.
    @inline(__always)
    public static func axpy<T: Scalar>(_ alpha: T, _ x: UnsafePointer<T>, into y: UnsafeMutablePointer<T>, count: Int) {
        for i in 0..<count { y[i] += alpha * x[i] }
    }

    /// Σ x y; Float sums in 16 lanes (`FloatKernels.dot`), Double in order.
    @inline(__always)
    public static func dot<T: Scalar>(_ x: UnsafePointer<T>, _ y: UnsafePointer<T>, count: Int) -> T {
        if T.self == Float.self { return FloatKernels.dot(asFloat(x), asFloat(y), count: count) as! T }
        var sum: T = 0
        for i in 0..<count { sum += x[i] * y[i] }
        return sum
    }

    /// columnSums[c] += sum over rows of x[r, c] (bias gradients). x: [rows, columns].
    public static func addColumnSums<T: Scalar>(_ x: UnsafePointer<T>, rows: Int, columns: Int, into columnSums: UnsafeMutablePointer<T>) {
        for row in 0..<rows { add(x + row * columns, into: columnSums, count: columns) }
    }

    /// x[r, :] += bias for every row.
    public static func addBias<T: Scalar>(_ bias: UnsafePointer<T>, to x: UnsafeMutablePointer<T>, rows: Int, columns: Int) {
        for row in 0..<rows { add(bias, into: x + row * columns, count: columns) }
    }

    public static func isFinite<T: Scalar>(_ x: UnsafePointer<T>, count: Int) -> Bool {
        var accumulator: T = 0
        for i in 0..<count { accumulator += x[i] * 0 }
        return accumulator == 0
    }

    public static func sumOfSquares<T: Scalar>(_ x: UnsafePointer<T>, count: Int) -> Double {
        if T.self == Float.self { return FloatKernels.sumOfSquares(asFloat(x), count: count) }
        var sum = SIMD16<T>(repeating: 0)
        var index = 0
        while index < count {
            let v = loadVector(x + index, lanes: min(16, count - index))
            sum += v * v
            index += 16
        }
        return Double(sum.sum())
    }
}
