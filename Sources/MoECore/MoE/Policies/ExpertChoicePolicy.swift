/// Expert choice (`expert_choice`, docs/ALGORITHMS.md 8): S = softmax(l); each expert takes its
/// C = min(N, ceil(N c / E)) highest-scoring tokens of the **global** batch (ties: lower global
/// index) with weight S; a token may get 0 to E experts. No auxiliary loss.
/// Not causal: allowed only with `gates.allow_non_causal` (the config refuses it otherwise).
public final class ExpertChoicePolicy<T: Scalar>: SelectionPolicy {
    public let expertCount: Int
    public let capacityFactor: Double
    var globalScores: [Double] = []
    var chosen: [Bool] = []
    var keptIndex: [Int32] = []     // [N, E]
    var row: [T] = []

    public init(expertCount: Int, capacityFactor: Double) {
        self.expertCount = expertCount
        self.capacityFactor = capacityFactor
        row = Array(repeating: 0, count: expertCount)
    }

    public func capacity(globalTokens: Int) -> Int {
        min(globalTokens, Int((Double(globalTokens) * capacityFactor / Double(expertCount)).rounded(.up)))
    }

    @_specialize(where T == Float)
    public func select(_ scores: RouterScores<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount, total = context.globalTokens, first = context.firstGlobalToken
        scores.softmax(rows: rows)
        let p = scores.probabilities
        if globalScores.count != total * experts { globalScores = Array(repeating: 0, count: total * experts) }
        for index in globalScores.indices { globalScores[index] = 0 }
        for s in 0..<rows { for e in 0..<experts { globalScores[(first + s) * experts + e] = Double(p[s, e]) } }
        try context.communicator.allReduce(&globalScores)
        // Every rank ranks the same global scores, then keeps its own tokens' picks.
        if chosen.count != rows * experts { chosen = Array(repeating: false, count: rows * experts); keptIndex = Array(repeating: -1, count: rows * experts) }
        for index in chosen.indices { chosen[index] = false; keptIndex[index] = -1 }
        let capacity = capacity(globalTokens: total)
        for e in 0..<experts {
            let order = (0..<total).sorted { (globalScores[$0 * experts + e], -$0) > (globalScores[$1 * experts + e], -$1) }
            for token in order.prefix(capacity) where token >= first && token < first + rows { chosen[(token - first) * experts + e] = true }
        }
        for s in 0..<rows {
            for e in 0..<experts where chosen[s * experts + e] {
                keptIndex[s * experts + e] = Int32(routing.count)
                routing.append(token: s, expert: e, weight: p[s, e])
            }
        }
    }

    /// dS = dw on the chosen pairs, then the per-token softmax backward.
    @_specialize(where T == Float)
    public func backward(_ dWeights: UnsafePointer<T>, routing: Routing<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {
        let experts = expertCount
        for s in 0..<dLogits.rows {
            for e in 0..<experts { row[e] = keptIndex[s * experts + e] >= 0 ? dWeights[Int(keptIndex[s * experts + e])] : 0 }
            row.withUnsafeMutableBufferPointer { v in
                Kernels.softmaxBackwardRow(probabilities: scores.probabilities.row(s), v.baseAddress!, count: experts)
                Kernels.add(v.baseAddress!, into: dLogits.row(s), count: experts)
            }
        }
    }
}
