import MoEIO
#if canImport(Glibc)
import Glibc
#endif

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
