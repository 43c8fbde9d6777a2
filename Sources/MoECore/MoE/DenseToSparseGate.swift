#if canImport(Glibc)
import Glibc
#endif

/// The temperature schedule of the Dense-To-Sparse gates (ALGORITHMS.md 4.2). n counts updates
/// since the experts were spawned (t - T_s).
public struct TemperatureSchedule: Sendable, Equatable {
    public enum Kind: String, Sendable { case linear, exp, constant }
    public var kind: Kind
    public var maximum: Double
    public var minimum: Double
    /// D: updates over which τ falls from `maximum` to `minimum`.
    public var annealSteps: Int
    /// H: from this n on, selection is hard top-1 (nil: never).
    public var hardStep: Int?
    /// T_s: the update at which the DTS clock starts.
    public var startStep: Int

    public init(kind: Kind, maximum: Double, minimum: Double, annealSteps: Int, hardStep: Int?, startStep: Int) {
        self.kind = kind
        self.maximum = maximum
        self.minimum = minimum
        self.annealSteps = max(1, annealSteps)
        self.hardStep = hardStep
        self.startStep = startStep
    }

    public func clock(_ step: Int) -> Int { max(0, step - startStep) }

    public func temperature(step: Int) -> Double {
        let n = Double(clock(step))
        switch kind {
        case .linear: return max(maximum - n * (maximum - minimum) / Double(annealSteps), minimum)
        case .exp: return max(maximum * Glibc.pow(minimum / maximum, n / Double(annealSteps)), minimum)
        case .constant: return maximum
        }
    }

    public func isHard(step: Int) -> Bool { hardStep.map { clock(step) >= $0 } ?? false }
}

/// EvoMoE's Dense-To-Sparse gate (`dts`, ALGORITHMS.md 4.2) and the activation dense-to-sparse
/// gate (`activation_dts`, section 10).
///
/// dts:            q = softmax((l + g) / τ), g Gumbel;  m = q > γ (hard: one-hot argmax(l + g));
///                 w = m ⊙ p with p = softmax(l) (or m ⊙ q)
/// activation_dts: G = softmax(φ(l + b) / τ);           m = G > γ (hard: one-hot argmax(l + b));
///                 w = m ⊙ G
/// No capacity and no renormalisation; aux loss λ E Σ_e me_e ce_e with me = mean w, ce = mean m
/// over the global batch. Evaluation routes each token to its top-1 expert with weight p (G).
/// Shapes: x [N, C], router [C, E], every cache [N, E].
public final class DenseToSparseGate<T: Scalar>: Gate {
    public enum Variant: Equatable, Sendable {
        case gumbel(weightsFromGumbel: Bool)
        case activation(tanh: Bool)
    }

    public let router: Parameter<T, Replicated>
    /// b of activation_dts, [1, E].
    public let bias: Parameter<T, Replicated>?
    public let variant: Variant
    public let schedule: TemperatureSchedule
    public let threshold: Double
    public let auxiliaryCoefficient: Double
    public var expertCount: Int { router.columns }

    // Forward cache [N, E]: p (dts) or G (activation); q (dts); φ(z) (activation); mask m.
    let probabilities = Tensor<T>(), gumbelSoftmax = Tensor<T>(), activated = Tensor<T>()
    var mask: [UInt8] = []
    var keptIndex: [Int32] = []        // [N, E]: index into routing or -1
    var selectionFraction: [T] = []    // ce_e (constant in backward)
    var temperature = 1.0
    var globalTokens = 0
    var training = false
    var statistics: [Double] = []      // Σ m (E values), Σ w (E values), Σ entropy(p_s)
    let dLogits = Tensor<T>()

    public init(router: Parameter<T, Replicated>, bias: Parameter<T, Replicated>?, variant: Variant,
                schedule: TemperatureSchedule, threshold: Double, auxiliaryCoefficient: Double) {
        if case .activation = variant { precondition(bias != nil, "activation_dts needs its bias") }
        self.router = router
        self.bias = bias
        self.variant = variant
        self.schedule = schedule
        self.threshold = threshold
        self.auxiliaryCoefficient = auxiliaryCoefficient
    }

    public func temperature(step: Int) -> Double? { schedule.temperature(step: step) }

    var isActivation: Bool { if case .activation = variant { return true } else { return false } }

    @inline(__always) func phi(_ z: T) -> T {
        if case .activation(let useTanh) = variant, useTanh { return T(Glibc.tanh(Double(z))) }
        return 1 / (1 + T(Glibc.exp(Double(-z))))
    }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount
        routing.reset(expertCount: experts)
        routing.globalTokens = context.globalTokens
        globalTokens = context.globalTokens
        training = context.training
        temperature = schedule.temperature(step: context.step)
        let tau = T(temperature)
        let hard = schedule.isHard(step: context.step)
        for tensor in [probabilities, gumbelSoftmax, activated] { tensor.resize(rows: rows, columns: experts) }
        if mask.count != rows * experts { mask = Array(repeating: 0, count: rows * experts); keptIndex = Array(repeating: -1, count: rows * experts) }
        if statistics.count != 2 * experts + 1 { statistics = Array(repeating: 0, count: 2 * experts + 1); selectionFraction = Array(repeating: 0, count: experts) }
        for index in statistics.indices { statistics[index] = 0 }
        // Logits l = x W_g (+ b): kept in `activated` until transformed.
        gemm(m: rows, n: experts, k: router.rows, a: x, b: router.value, c: activated.pointer)
        if let bias { Kernels.addBias(bias.value, to: activated.pointer, rows: rows, columns: experts) }
        let gumbelKey = context.noiseKey.derive("dts")
        for s in 0..<rows {
            let z = activated.row(s), p = probabilities.row(s), q = gumbelSoftmax.row(s)
            let m = s * experts
            for e in 0..<experts { mask[m + e] = 0; keptIndex[m + e] = -1 }
            var argmaxIndex = 0
            if isActivation {
                for e in 0..<experts where z[e] > z[argmaxIndex] { argmaxIndex = e }   // φ is monotone
                for e in 0..<experts { z[e] = phi(z[e]); p[e] = z[e] / tau }
                Kernels.softmaxRow(p, count: experts)    // G
                if !context.training || hard { mask[m + argmaxIndex] = 1 } else {
                    for e in 0..<experts where Double(p[e]) > threshold { mask[m + e] = 1 }
                }
            } else {
                for e in 0..<experts { p[e] = z[e] }
                Kernels.softmaxRow(p, count: experts)
                if !context.training {
                    for e in 0..<experts where z[e] > z[argmaxIndex] { argmaxIndex = e }
                    mask[m + argmaxIndex] = 1
                } else {
                    let stream = gumbelKey.derive(context.firstGlobalToken + s)
                    for e in 0..<experts { q[e] = (z[e] + T(stream.gumbel(e))) / tau }
                    for e in 0..<experts where q[e] > q[argmaxIndex] { argmaxIndex = e }   // argmax(l + g)
                    Kernels.softmaxRow(q, count: experts)
                    if hard { mask[m + argmaxIndex] = 1 } else {
                        for e in 0..<experts where Double(q[e]) > threshold { mask[m + e] = 1 }
                    }
                }
            }
            for e in 0..<experts where p[e] > 0 { statistics[2 * experts] -= Double(p[e]) * _log(Double(p[e])) }
            var any = false
            for e in 0..<experts where mask[m + e] != 0 { any = true }
            if !any { mask[m + argmaxIndex] = 1 }   // soft selection always keeps at least one expert
            let weights = (variant == .gumbel(weightsFromGumbel: true) && context.training) ? q : p
            for e in 0..<experts where mask[m + e] != 0 {
                keptIndex[m + e] = Int32(routing.count)
                routing.append(token: s, expert: e, weight: weights[e])
                statistics[e] += 1
                statistics[experts + e] += Double(weights[e])
            }
        }
        try context.communicator.allReduce(&statistics)
        let n = Double(context.globalTokens)
        var auxiliary = 0.0
        for e in 0..<experts {
            let selected = Int64(statistics[e])
            routing.keptPerExpert[e] = selected
            routing.selectedCount += selected
            routing.keptCount += selected
            selectionFraction[e] = T(statistics[e] / n)
            auxiliary += (statistics[experts + e] / n) * (statistics[e] / n)
        }
        routing.auxiliaryLoss = context.training ? auxiliaryCoefficient * Double(experts) * auxiliary : 0
        routing.routerEntropy = statistics[2 * experts] / n
    }

    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        let experts = expertCount
        dLogits.resize(rows: rows, columns: experts, zero: true)
        // ∂(λ E Σ me ce)/∂w_{s,e} = λ E ce_e / N for selected pairs.
        let auxiliaryScale = training ? T(auxiliaryCoefficient * Double(experts) / Double(globalTokens)) : 0
        let tau = T(temperature)
        for s in 0..<rows {
            let m = s * experts, dl = dLogits.row(s)
            // dl first holds d(weights source): dp, dq or dG.
            for e in 0..<experts where keptIndex[m + e] >= 0 {
                dl[e] = dWeights[Int(keptIndex[m + e])] + auxiliaryScale * selectionFraction[e]
            }
            switch variant {
            case .gumbel(let fromGumbel) where fromGumbel && training:
                // w = m ⊙ q, q = softmax((l + g)/τ): dl = (1/τ) q ⊙ (dq - <q, dq>)
                Kernels.softmaxBackwardRow(probabilities: gumbelSoftmax.row(s), dl, count: experts)
                for e in 0..<experts { dl[e] /= tau }
            case .gumbel:
                Kernels.softmaxBackwardRow(probabilities: probabilities.row(s), dl, count: experts)
            case .activation(let useTanh):
                // G = softmax(φ(z)/τ): du = G ⊙ (dG - <G, dG>), dz = du φ'(z) / τ
                Kernels.softmaxBackwardRow(probabilities: probabilities.row(s), dl, count: experts)
                let a = activated.row(s)
                for e in 0..<experts {
                    let derivative = useTanh ? 1 - a[e] * a[e] : a[e] * (1 - a[e])
                    dl[e] *= derivative / tau
                }
            }
        }
        if let bias { Kernels.addColumnSums(dLogits.pointer, rows: rows, columns: experts, into: bias.gradient) }
        routerBackward(router, input: x, dLogits: dLogits.pointer, rows: rows, dx: dx)
    }
}
