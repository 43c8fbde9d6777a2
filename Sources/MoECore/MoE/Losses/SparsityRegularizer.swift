import MoEIO

/// ReLU routing's L1 regulariser (λ/L) (1/N) Σ_{s,e} f_e r_{s,e}, f_e = E n_e / (k N) over the
/// global batch, averaged over the L MoE layers, training only; λ adapts after every update
/// towards a target fraction of zero weights (docs/ALGORITHMS.md 9.1).
public final class SparsityRegularizer<T: Scalar>: AuxiliaryLoss {
    public let targetActive: Int
    public let multiplier: Double
    public let targetSparsity: Double
    public let layerCount: Int
    public var lambda: Double
    var fraction: [T]

    public init(experts: Int, targetActive: Int, initialLambda: Double, multiplier: Double, targetSparsity: Double, layerCount: Int) {
        self.targetActive = targetActive
        self.lambda = initialLambda
        self.multiplier = multiplier
        self.targetSparsity = targetSparsity > 0 ? targetSparsity : 1 - Double(targetActive) / Double(experts)
        self.layerCount = max(1, layerCount)
        fraction = Array(repeating: 0, count: experts)
    }

    var coefficient: Double { lambda / Double(layerCount) }
    public var sumCount: Int { fraction.count }

    /// Σ_s r_{s,e} per expert.
    @_specialize(where T == Float)
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        addWeightSums(input.routing, into: sums)
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double {
        let n = input.tokens, experts = fraction.count
        var regulariser = 0.0
        for e in 0..<experts {
            let f = Double(experts) * Double(input.routing.statistics.keptPerExpert[e]) / (Double(targetActive) * n)
            fraction[e] = T(f)
            regulariser += f * sums[e] / n
        }
        return input.routing.training ? coefficient * regulariser : 0
    }

    /// dr_{s,e} += (λ/L) f_e / N on the active pairs.
    @_specialize(where T == Float)
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        addPerExpertGradient(input.routing, scale: T(coefficient * input.weight / input.tokens), perExpert: fraction, into: dWeights)
    }

    /// Sparsity below target (too many active experts) raises the penalty; above it, lowers it.
    /// The sparsity is over all MoE layers, so every layer's λ moves together.
    public func adapt(to layers: [RoutingStatistics]) {
        guard !layers.isEmpty else { return }
        let active = layers.map(\.activeExperts).reduce(0, +) / Double(layers.count)
        let sparsity = 1 - active / Double(fraction.count)
        if sparsity < targetSparsity { lambda *= multiplier } else if sparsity > targetSparsity { lambda /= multiplier }
    }

    public var state: [String: Double] {
        get { ["lambda": lambda] }
        set { if let value = newValue["lambda"] { lambda = value } }
    }
}
