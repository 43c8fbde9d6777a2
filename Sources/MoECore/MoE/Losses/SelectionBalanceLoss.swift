import MoEIO

/// EvoMoE's balance loss λ E Σ_e me_e ce_e (docs/ALGORITHMS.md 4.2), training only: me_e the mean
/// routing weight and ce_e the fraction of tokens selecting e, over the global batch. ce is a
/// constant, so dw_{s,e} += λ E ce_e / N on the selected pairs.
public final class SelectionBalanceLoss<T: Scalar>: AuxiliaryLoss {
    public let coefficient: Double
    var selectionFraction: [T]

    public init(coefficient: Double, experts: Int) {
        self.coefficient = coefficient
        selectionFraction = Array(repeating: 0, count: experts)
    }

    public var sumCount: Int { selectionFraction.count }

    /// Σ_s w_{s,e} per expert.
    @_specialize(where T == Float)
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        addWeightSums(input.routing, into: sums)
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double {
        let n = input.tokens, experts = selectionFraction.count
        var total = 0.0
        for e in 0..<experts {
            let ce = Double(input.routing.statistics.keptPerExpert[e]) / n
            selectionFraction[e] = T(ce)
            total += (sums[e] / n) * ce
        }
        return input.routing.training ? coefficient * Double(experts) * total : 0
    }

    @_specialize(where T == Float)
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        guard input.routing.training else { return }
        let scale = T(coefficient * input.weight * Double(selectionFraction.count) / input.tokens)
        addPerExpertGradient(input.routing, scale: scale, perExpert: selectionFraction, into: dWeights)
    }
}
