/// What a normalisation's backward needs besides x: per-row mean (LayerNorm) and reciprocal
/// standard deviation (both norms), [N] each.
public final class NormCache<T: Scalar> {
    let mean = Tensor<T>(), reciprocalDeviation = Tensor<T>()
    public init() {}
}

/// `body(first row, rows)` over blocks of rows of about 8 KB (`width` values a row), so that a
/// pass writing a block and the pass reading it back find it in the first-level cache.
@inline(__always) func forEachRowBlock(rows: Int, width: Int, _ body: (Int, Int) -> Void) {
    let block = max(1, 2048 / max(width, 1))
    for first in stride(from: 0, to: rows, by: block) { body(first, min(block, rows - first)) }
}

/// Layer normalisation over the last dimension. x, y: [N, C]; gain, bias: [C].
/// Float runs `FloatKernels.layerNormForward/Backward` (the same math, row sums in 16 lanes);
/// the loops here are the reference, in Double for the gradient checks.
public struct LayerNorm<T: Scalar> {
    public let gain: Parameter<T, Replicated>
    public let bias: Parameter<T, Replicated>
    public let epsilon: T

    public typealias Cache = NormCache<T>

    public init(store: ParameterStore<T, Replicated>, path: ParameterPath, width: Int, epsilon: Double = 1e-5, decay: Bool) {
        gain = store.add(path.appending("gain"), rows: 1, columns: width, weightDecay: decay, initialization: .ones)
        bias = store.add(path.appending("bias"), rows: 1, columns: width, weightDecay: decay, initialization: .zeros)
        self.epsilon = T(epsilon)
    }

    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, cache: Cache) {
        cache.mean.resize(rows: rows, columns: 1)
        cache.reciprocalDeviation.resize(rows: rows, columns: 1)
        forward(x, rows: rows, into: y, means: cache.mean.pointer, reciprocals: cache.reciprocalDeviation.pointer)
    }

    /// Rows of x into y, each row's mean and reciprocal deviation into `means` and `reciprocals`.
    func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, means: UnsafeMutablePointer<T>,
                         reciprocals: UnsafeMutablePointer<T>) {
        let width = gain.columns
        let inverseWidth = 1 / T(width)
        // Pointers hoisted out of the loops: reaching them through the store costs a retain.
        let gain = self.gain.value, bias = self.bias.value
        if T.self == Float.self {
            return FloatKernels.layerNormForward(asFloat(x), asFloat(y), rows: rows, width: width, gain: asFloat(UnsafePointer(gain)),
                                                 bias: asFloat(UnsafePointer(bias)), epsilon: Float(epsilon), means: asFloat(means),
                                                 reciprocals: asFloat(reciprocals))
        }
        for row in 0..<rows {
            let input = x + row * width, output = y + row * width
            var sum: T = 0
            for c in 0..<width { sum += input[c] }
            let mean = sum * inverseWidth
            var squares: T = 0
            for c in 0..<width { let d = input[c] - mean; squares += d * d }
            let reciprocal = 1 / (squares * inverseWidth + epsilon).squareRoot()
            for c in 0..<width { output[c] = (input[c] - mean) * reciprocal * gain[c] + bias[c] }
            means[row] = mean
            reciprocals[row] = reciprocal
        }
    }

    /// Adjoint: dgain += Σ dy·x̂, dbias += Σ dy, dx += rstd (dŷ - mean(dŷ) - x̂ mean(dŷ·x̂)), dŷ = dy·gain.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>, cache: Cache) {
        let width = gain.columns
        let inverseWidth = 1 / T(width)
        let gain = self.gain.value, gainGradient = self.gain.gradient, biasGradient = self.bias.gradient
        let means = cache.mean.pointer, reciprocals = cache.reciprocalDeviation.pointer
        if T.self == Float.self {
            return FloatKernels.layerNormBackward(asFloat(x), asFloat(dy), asFloat(dx), rows: rows, width: width,
                                                  gain: asFloat(UnsafePointer(gain)), gainGradient: asFloat(gainGradient),
                                                  biasGradient: asFloat(biasGradient), means: asFloat(UnsafePointer(means)),
                                                  reciprocals: asFloat(UnsafePointer(reciprocals)))
        }
        for row in 0..<rows {
            let input = x + row * width, dOut = dy + row * width, dIn = dx + row * width
            let mean = means[row], reciprocal = reciprocals[row]
            var meanDNorm: T = 0, meanDNormTimesNorm: T = 0
            for c in 0..<width {
                let normalized = (input[c] - mean) * reciprocal
                let dNorm = dOut[c] * gain[c]
                meanDNorm += dNorm
                meanDNormTimesNorm += dNorm * normalized
                gainGradient[c] += dOut[c] * normalized
                biasGradient[c] += dOut[c]
            }
            meanDNorm *= inverseWidth
            meanDNormTimesNorm *= inverseWidth
            for c in 0..<width {
                let normalized = (input[c] - mean) * reciprocal
                dIn[c] += reciprocal * (dOut[c] * gain[c] - meanDNorm - normalized * meanDNormTimesNorm)
            }
        }
    }
}
