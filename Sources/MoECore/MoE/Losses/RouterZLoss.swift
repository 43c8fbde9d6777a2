import MoEIO

/// ST-MoE's router z-loss β (1/N) Σ_s (log Σ_e exp l_{s,e})²: keeps the logits small.
public final class RouterZLoss<T: Scalar>: AuxiliaryLoss {
    public let coefficient: Double
    public init(coefficient: Double) { self.coefficient = coefficient }
    public var sumCount: Int { 1 }

    @_specialize(where T == Float)
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        for s in 0..<input.rows { sums[0] += Double(input.scores.logSumExp[s] * input.scores.logSumExp[s]) }
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double { coefficient * sums[0] / input.tokens }

    /// d(lse²)/dl = 2 lse p.
    @_specialize(where T == Float)
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        let scale = T(coefficient * input.weight) * 2 / T(input.tokens), experts = dLogits.columns
        for s in 0..<input.rows {
            let p = input.scores.probabilities.row(s), dl = dLogits.row(s), factor = scale * input.scores.logSumExp[s]
            for e in 0..<experts { dl[e] += factor * p[e] }
        }
    }
}
