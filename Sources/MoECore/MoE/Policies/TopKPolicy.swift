import MoEIO
import MoEComm

/// Softmax top-k with capacity (docs/ALGORITHMS.md 2): the policy of `topk`, `switch` and
/// `gshard`.
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
    public var drops: Bool { true }

    // Forward cache.
    var selectedExpert: [Int32] = []       // [N, k], -1: no expert (gshard's discarded second)
    var selectedWeight: [T] = []           // [N, k]: weights before dropping (renormalised modes)
    var keptIndex: [Int32] = []            // [N, k]: index into routing, or -1 if dropped
    // Scratch: counts per (choice rank, expert) on this rank, on the ranks before it, on all.
    var localCounts: [Int64] = [], countsBefore: [Int64] = [], countsTotal: [Int64] = []
    var nextSlot: [Int64] = []             // next free global slot per (choice rank, expert)
    var row: [T] = []                      // [E] backward scratch

    public init(expertCount: Int, k: Int, renormalization: Renormalization, capacityFactor: Double?,
                evalCapacityFactor: Double?, minimumCapacity: Int, secondChoice: SecondChoicePolicy? = nil) {
        precondition(k >= 1 && k <= expertCount, "top_k must be between 1 and the number of experts")
        precondition(secondChoice == nil || k == 2, "gshard routes to two experts")
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
        scores.softmax(rows: rows)
        resizeCaches(rows: rows)
        for s in 0..<rows { choose(token: s, probabilities: scores.probabilities.row(s), context: context) }
        for c in 0..<k {
            for e in 0..<expertCount {
                routing.selectedPerExpert[e] += localCounts[c * expertCount + e]
                if c == 0 { routing.firstChoicesPerExpert[e] = localCounts[e] }
            }
        }
        try assignGlobalSlots(communicator: context.communicator)
        let capacity = context.dropless ? Int.max : capacity(globalTokens: context.globalTokens, training: context.training) ?? Int.max
        for s in 0..<rows { keep(token: s, probabilities: scores.probabilities.row(s), capacity: capacity, into: routing) }
    }

    /// The k largest probabilities of token s (ties: lowest expert index), gshard's second choice
    /// by its policy; the weights before dropping.
    private func choose(token s: Int, probabilities p: UnsafeMutablePointer<T>, context: RoutingContext) {
        let experts = expertCount
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
                for e in 0..<experts where !isSelected(e, token: s, upTo: c) && (best < 0 || p[e] > p[best]) { best = e }
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
            selectedWeight[s * k + c] = renormalization == .beforeDrop ? pe / sum : pe
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
            if renormalization == .afterDrop { selectedWeight[s * k + c] = p[e] / max(keptSum, T(1.19e-7)) }
            keptIndex[s * k + c] = Int32(routing.count)
            routing.append(token: s, expert: e, weight: selectedWeight[s * k + c])
        }
    }

    private func resizeCaches(rows: Int) {
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
        let experts = expertCount
        for s in 0..<dLogits.rows {
            let dl = dLogits.row(s)
            guard renormalization != .none else {
                for e in 0..<experts { row[e] = 0 }
                for c in 0..<k where keptIndex[s * k + c] >= 0 { row[Int(selectedExpert[s * k + c])] += dWeights[Int(keptIndex[s * k + c])] }
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
            for c in 0..<k where selectedExpert[s * k + c] >= 0 {
                let kept = keptIndex[s * k + c] >= 0
                guard kept || renormalization == .beforeDrop else { continue }
                let dw = kept ? dWeights[Int(keptIndex[s * k + c])] : 0
                dl[Int(selectedExpert[s * k + c])] += selectedWeight[s * k + c] * (dw - weightedSum)
            }
        }
    }
}
