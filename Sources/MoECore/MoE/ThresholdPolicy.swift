import MoEIO
#if canImport(Glibc)
import Glibc
#endif

/// The temperature schedule of the Dense-To-Sparse gates (docs/ALGORITHMS.md 4.2). n counts
/// updates since the experts were spawned (t - T_s).
public struct TemperatureSchedule: Sendable, Equatable {
    public var kind: TemperatureScheduleKind
    public var maximum: Double
    public var minimum: Double
    /// D: updates over which τ falls from `maximum` to `minimum`.
    public var annealSteps: Int
    /// H: from this n on, selection is hard top-1 (nil: never).
    public var hardStep: Int?
    /// T_s: the update at which the DTS clock starts.
    public var startStep: Int

    public init(kind: TemperatureScheduleKind, maximum: Double, minimum: Double, annealSteps: Int, hardStep: Int?, startStep: Int) {
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

/// Threshold selection: every (token, expert) pair whose weight passes a threshold is kept, with
/// no capacity and no renormalisation (docs/ALGORITHMS.md 4.2, 9.1, 10).
///
/// relu:           w = ReLU(l), kept where l > 0 (ReMoE).
/// dts:            q = softmax((l + g) / τ), g Gumbel; m = q > γ (hard: one-hot argmax(l + g));
///                 w = m ⊙ p with p = softmax(l) (or m ⊙ q). Evaluation: top-1 with weight p.
/// activation_dts: G = softmax(φ(l) / τ) (l includes the router's bias); m = G > γ (hard and
///                 evaluation: one-hot argmax l); w = m ⊙ G.
/// The soft selections always keep at least the argmax. Shapes: every cache [N, E].
public final class ThresholdPolicy<T: Scalar>: SelectionPolicy {
    public enum Transform: Equatable, Sendable {
        case relu
        case gumbelSoftmax(weightsFromGumbel: Bool)
        case activation(tanh: Bool)
    }

    public let expertCount: Int
    public let transform: Transform
    /// The temperature schedule (dts and activation_dts).
    public let schedule: TemperatureSchedule?
    public let threshold: Double

    // Forward cache: q (dts), φ(l) (activation), the kept index of every pair (-1: not kept).
    let gumbelSoftmax = Tensor<T>(), activated = Tensor<T>()
    var keptIndex: [Int32] = []
    var temperature = 1.0
    var training = false
    var row: [T] = []

    public init(expertCount: Int, transform: Transform, schedule: TemperatureSchedule?, threshold: Double) {
        precondition(transform == .relu || schedule != nil, "the dense-to-sparse transforms anneal a temperature")
        self.expertCount = expertCount
        self.transform = transform
        self.schedule = schedule
        self.threshold = threshold
        row = Array(repeating: 0, count: expertCount)
    }

    public func temperature(step: Int) -> Double? { schedule?.temperature(step: step) }
    public func phase(step: Int) -> TrainingPhase {
        guard let schedule else { return .sparse }
        return schedule.isHard(step: step) ? .hard : .soft
    }

    @_specialize(where T == Float)
    public func select(_ scores: RouterScores<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount
        training = context.training
        temperature = schedule?.temperature(step: context.step) ?? 1
        let hard = schedule?.isHard(step: context.step) ?? false
        if keptIndex.count != rows * experts { keptIndex = Array(repeating: -1, count: rows * experts) }
        for index in 0..<rows * experts { keptIndex[index] = -1 }
        switch transform {
        case .relu:
            for s in 0..<rows { for e in 0..<experts where scores.logits[s, e] > 0 { keep(s, e, scores.logits[s, e], routing) } }
        case .gumbelSoftmax(let fromGumbel):
            scores.softmax(rows: rows)
            gumbelSoftmax.resize(rows: rows, columns: experts)
            for s in 0..<rows {
                let argmax = gumbelRow(s, scores: scores, context: context)
                let weights = fromGumbel && context.training ? gumbelSoftmax.row(s) : scores.probabilities.row(s)
                let q = context.training && !hard ? gumbelSoftmax.row(s) : nil
                keepRow(s, argmax: argmax, selectionScores: q, weights: weights, routing)
            }
        case .activation:
            activationRows(rows, scores: scores)
            for s in 0..<rows {
                var argmax = 0
                for e in 0..<experts where scores.logits[s, e] > scores.logits[s, argmax] { argmax = e }   // φ is monotone
                let g = scores.probabilities.row(s)
                keepRow(s, argmax: argmax, selectionScores: context.training && !hard ? g : nil, weights: g, routing)
            }
        }
    }

    @inline(__always) private func keep(_ s: Int, _ e: Int, _ weight: T, _ routing: Routing<T>) {
        keptIndex[s * expertCount + e] = Int32(routing.count)
        routing.append(token: s, expert: e, weight: weight)
    }

    /// Keeps the experts whose selection score passes the threshold, or the argmax alone (no
    /// selection scores: hard or evaluation, or nothing passed).
    private func keepRow(_ s: Int, argmax: Int, selectionScores: UnsafeMutablePointer<T>?, weights: UnsafeMutablePointer<T>,
                         _ routing: Routing<T>) {
        let start = routing.count
        if let selectionScores {
            for e in 0..<expertCount where Double(selectionScores[e]) > threshold { keep(s, e, weights[e], routing) }
        }
        if routing.count == start { keep(s, argmax, weights[argmax], routing) }
    }

    /// q = softmax((l + g) / τ) into `gumbelSoftmax` (training); returns argmax(l + g), or
    /// argmax l in evaluation.
    private func gumbelRow(_ s: Int, scores: RouterScores<T>, context: RoutingContext) -> Int {
        let z = scores.logits.row(s), q = gumbelSoftmax.row(s), tau = T(temperature)
        var argmax = 0
        guard context.training else {
            for e in 0..<expertCount where z[e] > z[argmax] { argmax = e }
            return argmax
        }
        let stream = context.noiseKey.derive("dts").derive(context.firstGlobalToken + s)
        for e in 0..<expertCount { q[e] = (z[e] + T(stream.gumbel(e))) / tau }
        for e in 0..<expertCount where q[e] > q[argmax] { argmax = e }
        Kernels.softmaxRow(q, count: expertCount)
        return argmax
    }

    /// G = softmax(φ(l) / τ) into the scores' probabilities; φ(l) kept in `activated`.
    private func activationRows(_ rows: Int, scores: RouterScores<T>) {
        guard case .activation(let useTanh) = transform else { return }
        activated.resize(rows: rows, columns: expertCount)
        scores.probabilities.resize(rows: rows, columns: expertCount)
        let tau = T(temperature)
        for s in 0..<rows {
            let z = scores.logits.row(s), a = activated.row(s), g = scores.probabilities.row(s)
            for e in 0..<expertCount {
                a[e] = useTanh ? T(Glibc.tanh(Double(z[e]))) : 1 / (1 + T(Glibc.exp(Double(-z[e]))))
                g[e] = a[e] / tau
            }
            Kernels.softmaxRow(g, count: expertCount)
        }
        scores.markProbabilitiesFilled()
    }

    /// relu: dl = dw on kept pairs. dts: dl = p ⊙ (dp - <p, dp>), or (1/τ) q ⊙ (dq - <q, dq>) with
    /// Gumbel weights. activation: du = G ⊙ (dG - <G, dG>), dl = du φ'(l) / τ.
    @_specialize(where T == Float)
    public func backward(_ dWeights: UnsafePointer<T>, routing: Routing<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {
        let experts = expertCount, tau = T(temperature)
        for s in 0..<dLogits.rows {
            let dl = dLogits.row(s)
            for e in 0..<experts { row[e] = keptIndex[s * experts + e] >= 0 ? dWeights[Int(keptIndex[s * experts + e])] : 0 }
            if transform == .relu {
                Kernels.add(row, into: dl, count: experts)
                continue
            }
            let fromGumbel = transform == .gumbelSoftmax(weightsFromGumbel: true) && training
            let distribution = fromGumbel ? gumbelSoftmax.row(s) : scores.probabilities.row(s)
            row.withUnsafeMutableBufferPointer { Kernels.softmaxBackwardRow(probabilities: distribution, $0.baseAddress!, count: experts) }
            switch transform {
            case .gumbelSoftmax:
                for e in 0..<experts { dl[e] += fromGumbel ? row[e] / tau : row[e] }
            case .activation(let useTanh):
                let a = activated.row(s)
                for e in 0..<experts { dl[e] += row[e] * (useTanh ? 1 - a[e] * a[e] : a[e] * (1 - a[e])) / tau }
            case .relu: break
            }
        }
    }
}

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

// The two losses that weigh the routing mass of each expert by its selection count share these.

/// sums[e] += Σ of the kept weights routed to expert e.
private func addWeightSums<T: Scalar>(_ routing: Routing<T>, into sums: UnsafeMutablePointer<Double>) {
    for j in 0..<routing.count { sums[Int(routing.experts[j])] += Double(routing.weights[j]) }
}

/// dw_j += scale · perExpert[e_j] for every kept assignment j.
private func addPerExpertGradient<T: Scalar>(_ routing: Routing<T>, scale: T, perExpert: [T], into dWeights: UnsafeMutablePointer<T>) {
    for j in 0..<routing.count { dWeights[j] += scale * perExpert[Int(routing.experts[j])] }
}
