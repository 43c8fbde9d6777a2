import MoEIO

/// Switch's load-balancing loss α E Σ_e f_e P_e (docs/ALGORITHMS.md 3): f_e the fraction of
/// selections (before capacity) per expert over k N, or of first choices over N (gshard); P_e the
/// mean router probability. f is a constant; the gradient reaches the logits through P.
public final class LoadBalanceLoss<T: Scalar>: AuxiliaryLoss {
    public let coefficient: Double
    public let k: Int
    public let firstChoicesOnly: Bool
    var fraction: [T] = []
    var row: [T] = []

    public init(coefficient: Double, experts: Int, k: Int, firstChoicesOnly: Bool) {
        self.coefficient = coefficient
        self.k = k
        self.firstChoicesOnly = firstChoicesOnly
        fraction = Array(repeating: 0, count: experts)
        row = fraction
    }

    public var sumCount: Int { fraction.count }

    /// Σ_s p_{s,e} per expert.
    @_specialize(where T == Float)
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        let p = input.scores.probabilities, experts = p.columns
        for s in 0..<input.rows { for e in 0..<experts { sums[e] += Double(p[s, e]) } }
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double {
        let routing = input.routing, n = input.tokens
        var balance = 0.0
        for e in fraction.indices {
            let f = firstChoicesOnly ? Double(routing.globalFirstChoicesPerExpert[e]) / n
                : Double(routing.globalSelectedPerExpert[e]) / (Double(k) * n)
            fraction[e] = T(f)
            balance += f * sums[e] / n
        }
        return coefficient * Double(fraction.count) * balance
    }

    /// dl_s = p_s ⊙ (g - <p_s, g>) with g_e = α E f_e / N.
    @_specialize(where T == Float)
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        let experts = fraction.count, scale = T(coefficient * input.weight) * T(experts) / T(input.tokens)
        if T.self == Float.self && experts < 16 {
            for e in 0..<experts { row[e] = scale * fraction[e] }
            return row.withUnsafeBufferPointer { g in
                FloatKernels.narrowSoftmaxBackwardAdding(probabilities: asFloat(UnsafePointer(input.scores.probabilities.pointer)),
                                                         sharedGradient: asFloat(g.baseAddress!), rows: input.rows, count: experts,
                                                         into: asFloat(dLogits.pointer))
            }
        }
        for s in 0..<input.rows {
            for e in 0..<experts { row[e] = scale * fraction[e] }
            row.withUnsafeMutableBufferPointer { g in
                Kernels.softmaxBackwardRow(probabilities: input.scores.probabilities.row(s), g.baseAddress!, count: experts)
                Kernels.add(g.baseAddress!, into: dLogits.row(s), count: experts)
            }
        }
    }
}
