import MoEIO
import MoEComm

/// Softmax top-k with capacity (docs/ALGORITHMS.md 2): the policy of `topk`, `switch` and
/// `gshard`; for `topk` also DeepSeek-V3's routing (`Scoring`, docs/ALGORITHMS.md 11): sigmoid
/// affinities, a routed scale, loss-free balancing's selection bias and group-limited selection.
///
/// Slots follow the GShard order, computed over the global batch: all first choices before any
/// second choice, and within a choice rank by global token index (rank r's tokens after those
/// of ranks below r). So capacity decisions, and results, do not depend on the number of ranks.
/// Shapes: probabilities [N, E], selections [N, k].
public final class TopKPolicy<T: Scalar>: SelectionPolicy {
    public let expertCount: Int
    public let k: Int
    public let renormalization: Renormalization
    /// nil: dropless (every selected assignment is processed).
    public let capacityFactor: Double?
    public let evalCapacityFactor: Double?
    public let minimumCapacity: Int
    /// gshard: how the second expert is chosen.
    public let secondChoice: SecondChoicePolicy?
    public let scoring: Scoring
    public var drops: Bool { true }

    /// How affinities are scored and selected beyond plain softmax top-k.
    public struct Scoring: Sendable {
        public var function = ScoreFunction.softmax
        /// The routed weights' factor.
        public var routedScale = 1.0
        /// Loss-free balancing: the selection bias's step per update (0: no bias).
        public var biasUpdateRate = 0.0
        /// Experts in `groups` consecutive groups; a token keeps `groupLimit` of them (0: all).
        public var groups = 1
        public var groupLimit = 0
        public init() {}
        var limitsGroups: Bool { groupLimit > 0 && groupLimit < groups }
    }

    /// Loss-free balancing's per-expert bias (Double master, checkpointed), added to the
    /// affinities for selection only: the weights and the gradient never see it.
    public private(set) var bias: [Double]
    var selectionBias: [T]
    var groupScores: [T] = [], allowedExpert: [Bool] = []   // scratch [G], [E]

    // Forward cache.
    var selectedExpert: [Int32] = []       // [N, k], -1: no expert (gshard's discarded second)
    var selectedWeight: [T] = []           // [N, k]: weights before dropping (renormalised modes)
    var keptIndex: [Int32] = []            // [N, k]: index into routing, or -1 if dropped
    // Scratch: counts per (choice rank, expert) on this rank, on the ranks before it, on all.
    var localCounts: [Int64] = [], countsBefore: [Int64] = [], countsTotal: [Int64] = []
    var nextSlot: [Int64] = []             // next free global slot per (choice rank, expert)
    var row: [T] = []                      // [E] backward scratch

    public init(expertCount: Int, k: Int, renormalization: Renormalization, capacityFactor: Double?,
                evalCapacityFactor: Double?, minimumCapacity: Int, secondChoice: SecondChoicePolicy? = nil, scoring: Scoring = Scoring()) {
        precondition(k >= 1 && k <= expertCount, "top_k must be between 1 and the number of experts")
        precondition(secondChoice == nil || k == 2, "gshard routes to two experts")
        precondition(expertCount % scoring.groups == 0, "groups must divide the experts")
        self.scoring = scoring
        bias = Array(repeating: 0, count: expertCount)
        selectionBias = Array(repeating: 0, count: expertCount)
        self.expertCount = expertCount
        self.k = k
        self.renormalization = renormalization
        self.capacityFactor = capacityFactor
        self.evalCapacityFactor = evalCapacityFactor
        self.minimumCapacity = minimumCapacity
        self.secondChoice = secondChoice
    }

    /// Slots per expert over the global batch: min(N, max(C_min, ceil(k * CF * N / E))).
    public func capacity(globalTokens: Int, training: Bool) -> Int? {
        guard let factor = training ? capacityFactor : evalCapacityFactor else { return nil }
        let raw = Int((Double(k) * factor * Double(globalTokens) / Double(expertCount)).rounded(.up))
        return min(globalTokens, max(minimumCapacity, raw))
    }

    @_specialize(where T == Float)
    public func select(_ scores: RouterScores<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let affinities = self.affinities(scores, rows: rows)
        resizeCaches(rows: rows)
        for s in 0..<rows { choose(token: s, probabilities: affinities.row(s), context: context) }
        for c in 0..<k {
            for e in 0..<expertCount {
                routing.selectedPerExpert[e] += localCounts[c * expertCount + e]
                if c == 0 { routing.firstChoicesPerExpert[e] = localCounts[e] }
            }
        }
        try assignGlobalSlots(communicator: context.communicator)
        let capacity = context.dropless ? Int.max : capacity(globalTokens: context.globalTokens, training: context.training) ?? Int.max
        for s in 0..<rows { keep(token: s, probabilities: affinities.row(s), capacity: capacity, into: routing) }
    }

    /// The scores selection and weights read: softmax probabilities or sigmoid affinities.
    func affinities(_ scores: RouterScores<T>, rows: Int) -> Tensor<T> {
        guard scoring.function == .sigmoid else { scores.softmax(rows: rows); return scores.probabilities }
        scores.sigmoid(rows: rows)
        return scores.affinities
    }

    /// Group-limited routing: the `groupLimit` groups with the largest sum of their two best
    /// biased affinities (one for groups of one) are allowed (ties: lowest group index).
    private func allowGroups(_ p: UnsafeMutablePointer<T>) {
        let size = expertCount / scoring.groups
        for g in 0..<scoring.groups {
            var first = -T.infinity, second = -T.infinity
            for e in g * size..<(g + 1) * size {
                let key = p[e] + selectionBias[e]
                if key > first { (first, second) = (key, first) } else if key > second { second = key }
            }
            groupScores[g] = size == 1 ? first : first + second
        }
        for e in 0..<expertCount { allowedExpert[e] = false }
        for _ in 0..<scoring.groupLimit {
            var best = -1
            for g in 0..<scoring.groups where !allowedExpert[g * size] && (best < 0 || groupScores[g] > groupScores[best]) { best = g }
            for e in best * size..<(best + 1) * size { allowedExpert[e] = true }
        }
    }

    /// The k largest probabilities of token s (ties: lowest expert index), gshard's second choice
    /// by its policy; the weights before dropping.
    private func choose(token s: Int, probabilities p: UnsafeMutablePointer<T>, context: RoutingContext) {
        let experts = expertCount, limited = scoring.limitsGroups
        if limited { allowGroups(p) }
        var sum: T = 0
        for c in 0..<k {
            var best = -1
            if c == 1, secondChoice == .sampling, context.training {
                // argmax over the others of log p + g (= l + g up to a shared shift).
                let stream = context.noiseKey.derive("gumbel").derive(context.firstGlobalToken + s)
                var bestScore = -Double.infinity
                for e in 0..<experts where e != Int(selectedExpert[s * k]) {
                    let score = Double(T(_log(Double(p[e])))) + stream.gumbel(e)
                    if score > bestScore { bestScore = score; best = e }
                }
            } else {
                // The bias (zero without loss-free balancing) steers the choice, not the weight.
                for e in 0..<experts where !isSelected(e, token: s, upTo: c) && (!limited || allowedExpert[e])
                    && (best < 0 || p[e] + selectionBias[e] > p[best] + selectionBias[best]) { best = e }
            }
            if c == 1, secondChoice == .random, context.training {
                let first = p[Int(selectedExpert[s * k])]
                let u = context.noiseKey.derive("gumbel").derive(context.firstGlobalToken + s).uniform(experts)
                if u >= 2 * Double(p[best]) / Double(first + p[best]) { best = -1 }   // second choice discarded
            }
            selectedExpert[s * k + c] = Int32(best)
            guard best >= 0 else { continue }
            localCounts[c * experts + best] += 1
            sum += p[best]
        }
        for c in 0..<k where selectedExpert[s * k + c] >= 0 {
            let pe = p[Int(selectedExpert[s * k + c])]
            selectedWeight[s * k + c] = scaled(renormalization == .beforeDrop ? pe / sum : pe)
        }
    }

    @inline(__always)
    private func isSelected(_ expert: Int, token: Int, upTo choice: Int) -> Bool {
        for c in 0..<choice where selectedExpert[token * k + c] == Int32(expert) { return true }
        return false
    }

    /// The first global slot of this rank's selections per (choice rank, expert): the ranks
    /// below this one, and every rank's earlier choice ranks.
    private func assignGlobalSlots(communicator: Communicator) throws {
        for index in localCounts.indices { countsBefore[index] = localCounts[index]; countsTotal[index] = localCounts[index] }
        try countsBefore.withUnsafeMutableBufferPointer { try communicator.exclusiveScanSum($0) }
        try communicator.allReduce(&countsTotal)
        for index in countsBefore.indices { nextSlot[index] = countsBefore[index] }
        for c in 1..<max(k, 1) {
            for e in 0..<expertCount {
                for earlier in 0..<c { nextSlot[c * expertCount + e] += countsTotal[earlier * expertCount + e] }
            }
        }
    }

    /// Keeps token s's selections whose slot is below capacity, renormalises (after_drop) and
    /// appends them to the routing.
    private func keep(token s: Int, probabilities p: UnsafeMutablePointer<T>, capacity: Int, into routing: Routing<T>) {
        let experts = expertCount
        var keptSum: T = 0
        for c in 0..<k {
            let e = Int(selectedExpert[s * k + c])
            guard e >= 0 else { keptIndex[s * k + c] = -1; continue }
            let slot = nextSlot[c * experts + e]
            nextSlot[c * experts + e] += 1
            keptIndex[s * k + c] = slot < Int64(capacity) ? 0 : -1
            if slot < Int64(capacity) { keptSum += p[e] }
        }
        for c in 0..<k where keptIndex[s * k + c] >= 0 {
            let e = Int(selectedExpert[s * k + c])
            if renormalization == .afterDrop { selectedWeight[s * k + c] = scaled(p[e] / max(keptSum, T(1.19e-7))) }
            keptIndex[s * k + c] = Int32(routing.count)
            routing.append(token: s, expert: e, weight: selectedWeight[s * k + c])
        }
    }

    /// w · routed scale (the identity, exactly, at scale 1).
    @inline(__always) private func scaled(_ weight: T) -> T { scoring.routedScale == 1 ? weight : weight * T(scoring.routedScale) }

    private func resizeCaches(rows: Int) {
        if groupScores.count != scoring.groups { groupScores = Array(repeating: 0, count: scoring.groups) }
        if allowedExpert.count != expertCount { allowedExpert = Array(repeating: true, count: expertCount) }
        if selectedExpert.count != rows * k {
            selectedExpert = Array(repeating: 0, count: rows * k)
            selectedWeight = Array(repeating: 0, count: rows * k)
            keptIndex = Array(repeating: 0, count: rows * k)
        }
        if localCounts.count != k * expertCount {
            localCounts = Array(repeating: 0, count: k * expertCount)
            countsBefore = localCounts; countsTotal = localCounts; nextSlot = localCounts
            row = Array(repeating: 0, count: expertCount)
        }
        for index in localCounts.indices { localCounts[index] = 0 }
    }

    /// none: w = p on the kept pairs, dl = p ⊙ (dp - <p, dp>). Renormalised: w = softmax over the
    /// normalising set K (selected for before_drop, kept for after_drop), dl_j += w_j (dw_j - Σ_K w_i dw_i).
    @_specialize(where T == Float)
    public func backward(_ dWeights: UnsafePointer<T>, routing: Routing<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {
        if scoring.function == .sigmoid { return backwardSigmoid(dWeights, scores: scores, into: dLogits) }
        let experts = expertCount, scale = T(scoring.routedScale)
        for s in 0..<dLogits.rows {
            let dl = dLogits.row(s)
            guard renormalization != .none else {
                for e in 0..<experts { row[e] = 0 }
                for c in 0..<k where keptIndex[s * k + c] >= 0 {
                    row[Int(selectedExpert[s * k + c])] += scale == 1 ? dWeights[Int(keptIndex[s * k + c])] : scale * dWeights[Int(keptIndex[s * k + c])]
                }
                row.withUnsafeMutableBufferPointer { v in
                    Kernels.softmaxBackwardRow(probabilities: scores.probabilities.row(s), v.baseAddress!, count: experts)
                    Kernels.add(v.baseAddress!, into: dl, count: experts)
                }
                continue
            }
            var weightedSum: T = 0
            for c in 0..<k where keptIndex[s * k + c] >= 0 {
                weightedSum += selectedWeight[s * k + c] * dWeights[Int(keptIndex[s * k + c])]
            }
            if scale != 1 { weightedSum /= scale }   // Σ ŵ dw with the unscaled weights ŵ = w / scale
            for c in 0..<k where selectedExpert[s * k + c] >= 0 {
                let kept = keptIndex[s * k + c] >= 0
                guard kept || renormalization == .beforeDrop else { continue }
                let dw = kept ? dWeights[Int(keptIndex[s * k + c])] : 0
                dl[Int(selectedExpert[s * k + c])] += selectedWeight[s * k + c] * (dw - weightedSum)
            }
        }
    }

    /// Sigmoid affinities a = σ(l), w = γ a (none) or γ a_j / S over the normalising set K:
    /// da_j = γ dw_j, or (γ / S)(dw_j - Σ_K (w_i / γ) dw_i); then dl_j = da_j a_j (1 - a_j).
    private func backwardSigmoid(_ dWeights: UnsafePointer<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {
        let scale = T(scoring.routedScale)
        for s in 0..<dLogits.rows {
            let dl = dLogits.row(s), a = scores.affinities.row(s)
            var normaliser: T = 0, weightedSum: T = 0
            for c in 0..<k where selectedExpert[s * k + c] >= 0 {
                let kept = keptIndex[s * k + c] >= 0
                if kept { weightedSum += selectedWeight[s * k + c] * dWeights[Int(keptIndex[s * k + c])] }
                if kept || renormalization == .beforeDrop { normaliser += a[Int(selectedExpert[s * k + c])] }
            }
            weightedSum /= scale
            for c in 0..<k where selectedExpert[s * k + c] >= 0 {
                let e = Int(selectedExpert[s * k + c]), kept = keptIndex[s * k + c] >= 0
                let dw = kept ? dWeights[Int(keptIndex[s * k + c])] : 0
                let da: T
                switch renormalization {
                case .none: da = scale * dw
                case .beforeDrop: da = scale / normaliser * (dw - weightedSum)
                case .afterDrop:
                    guard kept else { continue }
                    da = scale / normaliser * (dw - weightedSum)
                }
                dl[e] += da * a[e] * (1 - a[e])
            }
        }
    }

    /// Loss-free balancing after an applied update: each expert's bias moves by the rate toward
    /// the mean load (up when it selected fewer than the mean, down when more), from the step's
    /// global selections, so every rank moves it alike.
    public func adapt(to statistics: RoutingStatistics) {
        guard scoring.biasUpdateRate > 0, statistics.selectedPerExpert.count == expertCount else { return }
        let loads = statistics.selectedPerExpert.map(Double.init), mean = loads.reduce(0, +) / Double(expertCount)
        for e in 0..<expertCount {
            let error = mean - loads[e]
            bias[e] += scoring.biasUpdateRate * (error > 0 ? 1 : error < 0 ? -1 : 0)
            selectionBias[e] = T(bias[e])
        }
    }

    /// The bias, checkpointed (`bias.E`).
    public var state: [String: Double] {
        get { scoring.biasUpdateRate > 0 ? Dictionary(uniqueKeysWithValues: bias.enumerated().map { ("bias.\($0.offset)", $0.element) }) : [:] }
        set {
            for e in 0..<expertCount {
                if let value = newValue["bias.\(e)"] { bias[e] = value; selectionBias[e] = T(value) }
            }
        }
    }
}
