/// Root-mean-square normalisation (Llama): y = x / sqrt(mean(x²) + eps) · gain, no centring, no
/// bias. x, y: [N, w]; gain: [w]. Besides the block norms it normalises queries and keys
/// (`model.qk_norm`), whose rows sit at a stride inside the QKV projection: hence the strided
/// entry points. Float runs `FloatKernels.rmsNorm*` (row sums in 16 lanes); the loops here are
/// the reference, in Double for the gradient checks.
public struct RMSNorm<T: Scalar> {
    public let gain: Parameter<T, Replicated>
    public let epsilon: T

    public var width: Int { gain.columns }

    public init(store: ParameterStore<T, Replicated>, path: ParameterPath, width: Int, epsilon: Double, decay: Bool) {
        gain = store.add(path.appending("gain"), rows: 1, columns: width, weightDecay: decay, initialization: .ones)
        self.epsilon = T(epsilon)
    }

    /// Contiguous rows; the cache keeps each row's reciprocal root mean square.
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, cache: NormCache<T>) {
        cache.reciprocalDeviation.resize(rows: rows, columns: 1)
        forward(x, stride: width, rows: rows, into: y, stride: width, reciprocals: cache.reciprocalDeviation.pointer)
    }

    /// Adjoint of `forward`: dgain += Σ dy·x̂, dx += r (dŷ - x̂ mean(dŷ·x̂)), dŷ = dy·gain.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>, cache: NormCache<T>) {
        backward(x, dy, stride: width, rows: rows, dx: dx, stride: width, reciprocals: cache.reciprocalDeviation.pointer)
    }

    /// Rows of `width` values starting every `inputStride` (x) and `outputStride` (y) elements.
    public func forward(_ x: UnsafePointer<T>, stride inputStride: Int, rows: Int, into y: UnsafeMutablePointer<T>,
                        stride outputStride: Int, reciprocals: UnsafeMutablePointer<T>) {
        let width = self.width, gain = UnsafePointer(self.gain.value)
        for row in 0..<rows {
            let input = x + row * inputStride, output = y + row * outputStride
            if T.self == Float.self {
                reciprocals[row] = T(FloatKernels.rmsNormForward(asFloat(input), asFloat(output), width: width, gain: asFloat(gain),
                                                                 epsilon: Float(epsilon)))
                continue
            }
            var squares: T = 0
            for c in 0..<width { squares += input[c] * input[c] }
            let reciprocal = 1 / (squares / T(width) + epsilon).squareRoot()
            for c in 0..<width { output[c] = input[c] * reciprocal * gain[c] }
            reciprocals[row] = reciprocal
        }
    }

    /// Strided adjoint; dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, stride inputStride: Int, rows: Int, dx: UnsafeMutablePointer<T>,
                         stride gradientStride: Int, reciprocals: UnsafePointer<T>) {
        let width = self.width, gain = UnsafePointer(self.gain.value), gainGradient = self.gain.gradient
        for row in 0..<rows {
            let input = x + row * inputStride, dOut = dy + row * gradientStride, dIn = dx + row * gradientStride
            let reciprocal = reciprocals[row]
            if T.self == Float.self {
                FloatKernels.rmsNormBackward(asFloat(input), asFloat(dOut), asFloat(dIn), width: width, gain: asFloat(gain),
                                             gainGradient: asFloat(gainGradient), reciprocal: Float(reciprocal))
                continue
            }
            var meanDNormTimesNorm: T = 0
            for c in 0..<width {
                let normalized = input[c] * reciprocal
                meanDNormTimesNorm += dOut[c] * gain[c] * normalized
                gainGradient[c] += dOut[c] * normalized
            }
            meanDNormTimesNorm /= T(width)
            for c in 0..<width {
                dIn[c] += reciprocal * (dOut[c] * gain[c] - input[c] * reciprocal * meanDNormTimesNorm)
            }
        }
    }
}

/// A block's normalisation: LayerNorm (gpt2) or RMSNorm (llama), with one cache type.
public enum Normalization<T: Scalar> {
    case layer(LayerNorm<T>)
    case rms(RMSNorm<T>)

    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, cache: NormCache<T>) {
        switch self {
        case let .layer(norm): norm.forward(x, rows: rows, into: y, cache: cache)
        case let .rms(norm): norm.forward(x, rows: rows, into: y, cache: cache)
        }
    }

    /// `forward` of the residual sum x = a + b, which is written to `sum` as well (x_mid = x +
    /// attn(...) and the next norm, for example): row block by row block, so each block is
    /// normalised while its sum is still in cache. The same arithmetic as the sum pass, then
    /// `forward`.
    public func forward(sumOf a: UnsafePointer<T>, _ b: UnsafePointer<T>, writingSumTo sum: UnsafeMutablePointer<T>, rows: Int,
                        into y: UnsafeMutablePointer<T>, cache: NormCache<T>) {
        let width: Int
        switch self {
        case let .layer(norm):
            width = norm.gain.columns
            cache.mean.resize(rows: rows, columns: 1)
        case let .rms(norm): width = norm.width
        }
        cache.reciprocalDeviation.resize(rows: rows, columns: 1)
        let reciprocals = cache.reciprocalDeviation.pointer
        forEachRowBlock(rows: rows, width: width) { first, count in
            let offset = first * width
            Kernels.sum(a + offset, b + offset, into: sum + offset, count: count * width)
            switch self {
            case let .layer(norm):
                norm.forward(sum + offset, rows: count, into: y + offset, means: cache.mean.pointer + first, reciprocals: reciprocals + first)
            case let .rms(norm):
                norm.forward(sum + offset, stride: width, rows: count, into: y + offset, stride: width, reciprocals: reciprocals + first)
            }
        }
    }

    /// dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>, cache: NormCache<T>) {
        switch self {
        case let .layer(norm): norm.backward(x, dy, rows: rows, dx: dx, cache: cache)
        case let .rms(norm): norm.backward(x, dy, rows: rows, dx: dx, cache: cache)
        }
    }
}
