/// logits = x W (+ b): the router of every gate but hash (docs/ALGORITHMS.md 2-10). BASE and
/// StableMoE call W their centroids and start it orthogonal.
///
/// Jitter (Switch's input noise, training only): the router sees x ⊙ u, u ~ U(1-ε, 1+ε) keyed
/// by global token index, so results do not depend on the number of ranks.
/// Shapes: x [N, C], weight [C, E], bias [1, E], logits [N, E].
public final class LinearRouter<T: Scalar>: Router {
    public let weight: Parameter<T, Replicated>
    public let bias: Parameter<T, Replicated>?
    public let jitter: Double
    /// Orthogonal initialisation of the weight's columns: gain and key (nil: the store's own).
    let orthogonal: (gain: Double, key: (_ seed: Int, _ layer: Int) -> RandomKey)?
    public var expertCount: Int { weight.columns }

    // Jitter: the router's input x ⊙ u and the factors u, [N, C] each; dx scratch.
    let jitteredInput = Tensor<T>(), jitterFactors = Tensor<T>(), dRouterInput = Tensor<T>()
    var jittered = false

    public init(weight: Parameter<T, Replicated>, bias: Parameter<T, Replicated>? = nil, jitter: Double = 0,
                orthogonal: (gain: Double, key: (_ seed: Int, _ layer: Int) -> RandomKey)? = nil) {
        precondition(bias == nil || bias!.count == weight.columns, "one bias per expert")
        self.weight = weight
        self.bias = bias
        self.jitter = jitter
        self.orthogonal = orthogonal
    }

    public func initializeState(seed: Int, layer: Int) {
        if let orthogonal { orthogonalColumns(weight, gain: orthogonal.gain, key: orthogonal.key(seed, layer)) }
    }

    @_specialize(where T == Float)
    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into logits: Tensor<T>) {
        jittered = context.training && jitter > 0
        let input = jittered ? UnsafePointer(jitter(x, rows: rows, context: context)) : x
        gemm(m: rows, n: expertCount, k: weight.rows, a: input, b: weight.value, c: logits.pointer)
        if let bias { Kernels.addBias(bias.value, to: logits.pointer, rows: rows, columns: expertCount) }
    }

    /// x ⊙ u into `jitteredInput`, keeping u for the backward.
    private func jitter(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext) -> UnsafeMutablePointer<T> {
        let width = weight.rows
        jitteredInput.resize(rows: rows, columns: width)
        jitterFactors.resize(rows: rows, columns: width)
        let key = context.noiseKey.derive("jitter")
        for s in 0..<rows {
            let stream = key.derive(context.firstGlobalToken + s)
            for c in 0..<width {
                let u = T(1 + jitter * (2 * stream.uniform(c) - 1))
                jitterFactors[s, c] = u
                jitteredInput[s, c] = x[s * width + c] * u
            }
        }
        return jitteredInput.pointer
    }

    /// dW += x'ᵀ dl, db += Σ_s dl, dx += (dl Wᵀ) (⊙ u with jitter, where x' = x ⊙ u).
    @_specialize(where T == Float)
    public func backward(_ x: UnsafePointer<T>, rows: Int, dLogits: UnsafePointer<T>, dx: UnsafeMutablePointer<T>) {
        let experts = expertCount, width = weight.rows
        if let bias { Kernels.addColumnSums(dLogits, rows: rows, columns: experts, into: bias.gradient) }
        let input = jittered ? UnsafePointer(jitteredInput.pointer) : x
        gemm(transposeA: true, m: width, n: experts, k: rows, a: input, b: dLogits, beta: 1, c: weight.gradient)
        guard jittered else {
            gemm(transposeB: true, m: rows, n: width, k: experts, a: dLogits, b: weight.value, beta: 1, c: dx)
            return
        }
        dRouterInput.resize(rows: rows, columns: width)
        gemm(transposeB: true, m: rows, n: width, k: experts, a: dLogits, b: weight.value, c: dRouterInput.pointer)
        for index in 0..<rows * width { dx[index] += dRouterInput.pointer[index] * jitterFactors.pointer[index] }
    }
}

/// Fills `parameter` [rows, columns] with orthonormal columns (times `gain`): Gram-Schmidt on
/// normal draws. Needs columns <= rows.
func orthogonalColumns<T: Scalar>(_ parameter: Parameter<T, Replicated>, gain: Double, key: RandomKey) {
    let rows = parameter.rows, columns = parameter.columns
    var basis: [[Double]] = []
    for column in 0..<columns {
        var v = (0..<rows).map { key.derive(column).normal($0) }
        for previous in basis {
            let projection = zip(v, previous).reduce(0) { $0 + $1.0 * $1.1 }
            for i in 0..<rows { v[i] -= projection * previous[i] }
        }
        let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
        basis.append(v.map { $0 / max(norm, 1e-12) })
    }
    for column in 0..<columns { for row in 0..<rows { parameter.value[row * columns + column] = T(gain * basis[column][row]) } }
}
