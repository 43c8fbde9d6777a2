import MoEIO

/// DeepSeek-V3's complementary sequence-wise balance loss (docs/ALGORITHMS.md 11): for each
/// sequence of T tokens, α Σ_e f_e P_e with f_e = E / (k T) × the sequence's kept assignments to
/// e and P_e the sequence's mean normalised affinity ŝ_e = a_e / Σ_j a_j (softmax scores: p);
/// averaged over the global batch's sequences. f is a constant; the gradient reaches the logits
/// through ŝ (and the sigmoid).
public final class SequenceBalanceLoss<T: Scalar>: AuxiliaryLoss {
    public let coefficient: Double
    public let k: Int
    let experts: Int
    var counts: [Double] = []      // [sequences, E]: kept assignments per sequence and expert
    // [E] scratch, reused from step to step.
    let normalised = Tensor<T>()
    var gradient: [T] = [], meanAffinity: [Double] = []

    public init(coefficient: Double, experts: Int, k: Int) {
        self.coefficient = coefficient
        self.experts = experts
        self.k = k
        normalised.resize(rows: 1, columns: experts)
        gradient = Array(repeating: 0, count: experts)
        meanAffinity = Array(repeating: 0, count: experts)
    }

    public var sumCount: Int { 1 }

    /// Σ over this rank's sequences of Σ_e f_e P_e.
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        let length = input.routing.sequenceLength, sequences = input.rows / length
        countAssignments(input.routing, sequences: sequences)
        var total = 0.0
        for q in 0..<sequences {
            for e in 0..<experts { meanAffinity[e] = 0 }
            for s in q * length..<(q + 1) * length {
                let row = normalisedAffinities(input.scores, row: s)
                for e in 0..<experts { meanAffinity[e] += Double(row[e]) / Double(length) }
            }
            for e in 0..<experts { total += fraction(q, e, length: length) * meanAffinity[e] }
        }
        sums[0] += total
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double {
        coefficient * sums[0] / (input.tokens / Double(input.routing.sequenceLength))
    }

    /// dŝ_{s,e} = α f_e / (T · sequences); ŝ = a / Σa: da_j = (g_j - Σ_e g_e ŝ_e) / Σa, dl_j = da_j a_j (1 - a_j);
    /// softmax scores: dl = p ⊙ (g - <p, g>).
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        let length = input.routing.sequenceLength
        let scale = coefficient * input.weight / (input.tokens / Double(length)) / Double(length)
        for s in 0..<input.rows {
            for e in 0..<experts { gradient[e] = T(scale * fraction(s / length, e, length: length)) }
            let dl = dLogits.row(s)
            if input.scores.hasProbabilities {
                gradient.withUnsafeMutableBufferPointer { g in
                    Kernels.softmaxBackwardRow(probabilities: input.scores.probabilities.row(s), g.baseAddress!, count: experts)
                    Kernels.add(g.baseAddress!, into: dl, count: experts)
                }
                continue
            }
            let a = input.scores.affinities.row(s)
            var total: T = 0, dot: T = 0
            for e in 0..<experts { total += a[e] }
            for e in 0..<experts { dot += gradient[e] * a[e] / total }
            for e in 0..<experts { dl[e] += (gradient[e] - dot) / total * a[e] * (1 - a[e]) }
        }
    }

    /// f_e of sequence q: E / (k T) × its kept assignments to e.
    @inline(__always) private func fraction(_ q: Int, _ e: Int, length: Int) -> Double {
        counts[q * experts + e] * Double(experts) / (Double(k) * Double(length))
    }

    private func countAssignments(_ routing: Routing<T>, sequences: Int) {
        if counts.count != sequences * experts { counts = Array(repeating: 0, count: sequences * experts) }
        for index in counts.indices { counts[index] = 0 }
        let length = routing.sequenceLength
        for (token, expert) in zip(routing.tokens, routing.experts) { counts[Int(token) / length * experts + Int(expert)] += 1 }
    }

    /// Row s of ŝ: the probabilities, or the sigmoid affinities divided by their sum (in the
    /// `normalised` scratch; valid until the next call).
    private func normalisedAffinities(_ scores: RouterScores<T>, row s: Int) -> UnsafePointer<T> {
        if scores.hasProbabilities { return UnsafePointer(scores.probabilities.row(s)) }
        let a = scores.affinities.row(s)
        var total: T = 0
        for e in 0..<experts { total += a[e] }
        let row = normalised.pointer
        for e in 0..<experts { row[e] = a[e] / total }
        return UnsafePointer(row)
    }
}
