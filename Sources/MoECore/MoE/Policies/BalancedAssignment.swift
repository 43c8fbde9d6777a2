/// Balanced assignment for BASE layers (docs/ALGORITHMS.md 6): give every expert exactly N/E tokens,
/// maximising Σ_s A[s, a(s)], by an ε-auction whose result is within N·ε of the optimum.
///
/// Slots bid for tokens: an expert with a free slot offers its best token s* the difference
/// between that token's value (score minus price) and its second-best value plus ε, taking it
/// from whichever expert held it. Deterministic: ties go to the lowest token and expert index.
public enum BalancedAssignment {
    /// Scores are compared on a fixed grid of `resolution`, as integers: prices and values are
    /// then exact, so the auction's many near-ties (prices equalise values) become exact ties,
    /// broken by index the same way on every rank and for any rank count. Last-bit differences of
    /// the scores (another rank count sums in another order) change a quantised score only when
    /// it sits within an ulp of a grid boundary.
    public static let resolution = 1.0 / 1024

    /// scores: [N, E] row-major (N a multiple of E); epsilon: the auction's bid increment (the
    /// result is within N·ε of the optimal total score). Returns the expert of every token.
    ///
    /// Tokens bid for experts, each expert holding N/E slots (Bertsekas' auction for similar
    /// objects): an unassigned token values expert e at score − price_e, where price_e is the
    /// lowest bid among e's holders once e is full (0 before); it bids for its best expert the
    /// difference to its second best plus ε, evicting that expert's lowest bidder when full.
    /// Tokens wait in a queue in index order; ties go to the lowest index.
    public static func solve(scores: [Double], tokens: Int, experts: Int, epsilon: Double) -> [Int] {
        precondition(tokens % experts == 0, "balanced assignment needs N divisible by E")
        precondition(scores.count == tokens * experts)
        guard tokens > 0 else { return [] }
        let low = scores.filter(\.isFinite).min() ?? 0
        // Non-finite scores count as the worst.
        let units = scores.map { Int64((($0.isFinite ? $0 : low) / resolution).rounded()) }
        let step = max(1, Int64((epsilon / resolution).rounded()))
        let slots = tokens / experts
        var owner = [Int](repeating: -1, count: tokens)
        var holders = (0..<experts).map { _ in Holders(capacity: slots) }
        var queue = Array(0..<tokens)
        var head = 0
        while head < queue.count {
            let s = queue[head]
            head += 1
            var best = 0, bestValue = Int64.min, secondValue = Int64.min
            for e in 0..<experts {
                let value = units[s * experts + e] - holders[e].price
                if value > bestValue { secondValue = bestValue; bestValue = value; best = e } else if value > secondValue { secondValue = value }
            }
            let offer = holders[best].price + (secondValue == Int64.min ? 0 : bestValue - secondValue) + step
            if let evicted = holders[best].take(token: s, bid: offer) {
                owner[evicted] = -1
                queue.append(evicted)
            }
            owner[s] = best
        }
        return owner
    }

    /// The tokens holding one expert's slots, as (bid, token) in a min-heap: the root is the
    /// cheapest slot, whose bid is the expert's price once it is full (0 before).
    struct Holders {
        let capacity: Int
        var heap: [(bid: Int64, token: Int)] = []

        init(capacity: Int) {
            self.capacity = capacity
            heap.reserveCapacity(capacity)
        }

        var price: Int64 { heap.count < capacity ? 0 : heap[0].bid }

        /// Gives a slot to `token`; returns the evicted lowest bidder when the expert was full.
        mutating func take(token: Int, bid: Int64) -> Int? {
            guard heap.count == capacity else {
                heap.append((bid, token))
                siftUp(heap.count - 1)
                return nil
            }
            let evicted = heap[0].token
            heap[0] = (bid, token)
            siftDown(0)
            return evicted
        }

        /// Lower bid first; among equal bids the higher token index is evicted first.
        private func below(_ a: Int, _ b: Int) -> Bool { (heap[a].bid, -heap[a].token) < (heap[b].bid, -heap[b].token) }

        private mutating func siftDown(_ start: Int) {
            var i = start
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count && below(l, m) { m = l }
                if r < heap.count && below(r, m) { m = r }
                if m == i { return }
                heap.swapAt(i, m)
                i = m
            }
        }

        private mutating func siftUp(_ start: Int) {
            var i = start
            while i > 0 {
                let parent = (i - 1) / 2
                guard below(i, parent) else { return }
                heap.swapAt(i, parent)
                i = parent
            }
        }
    }
}

/// BASE layers' policy (`base`, docs/ALGORITHMS.md 6), in SwiftMoE's block: the MoE output is
/// α_s F_{a(s)}(x_s) with α_s = σ(A[s, a(s)]) and A = X C the centroid scores, added to the
/// residual, which equals BASE's α f(x) + (1 - α) x for a residual expert f(x) = x + F(x).
/// Training assigns the **global** batch (all ranks' tokens, padded to a multiple of E with
/// constant-score dummies) so every expert gets its share of N_global / E tokens and results do
/// not depend on the number of ranks; evaluation takes the greedy argmax.
public final class BalancedAssignmentPolicy<T: Scalar>: SelectionPolicy {
    public let expertCount: Int
    public let epsilon: Double
    var globalScores: [Double] = []

    public init(expertCount: Int, epsilon: Double) {
        self.expertCount = expertCount
        self.epsilon = epsilon
    }

    @_specialize(where T == Float)
    public func select(_ scores: RouterScores<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount, a = scores.logits
        guard context.training else {
            for s in 0..<rows {
                var best = 0
                for e in 1..<experts where a[s, e] > a[s, best] { best = e }
                routing.append(token: s, expert: best, weight: sigmoid(a[s, best]))
            }
            return
        }
        // Every rank solves the same global problem; the dummies' assignments are discarded.
        let padded = (context.globalTokens + experts - 1) / experts * experts
        if globalScores.count != padded * experts { globalScores = Array(repeating: 0, count: padded * experts) }
        for index in globalScores.indices { globalScores[index] = 0 }
        for s in 0..<rows { for e in 0..<experts { globalScores[(context.firstGlobalToken + s) * experts + e] = Double(a[s, e]) } }
        try context.communicator.allReduce(&globalScores)
        let owners = BalancedAssignment.solve(scores: globalScores, tokens: padded, experts: experts, epsilon: epsilon)
        for s in 0..<rows {
            let e = owners[context.firstGlobalToken + s]
            routing.append(token: s, expert: e, weight: sigmoid(a[s, e]))
        }
    }

    /// w = α = σ(A[s, a]): dA[s, a] = dw α (1 - α); the assignment itself is constant.
    @_specialize(where T == Float)
    public func backward(_ dWeights: UnsafePointer<T>, routing: Routing<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {
        sigmoidWeightsBackward(dWeights, routing: routing, into: dLogits)
    }
}

/// dl[s, e] += dw α (1 - α) for routing weights α = σ(l[s, e]) (BASE, StableMoE).
func sigmoidWeightsBackward<T: Scalar>(_ dWeights: UnsafePointer<T>, routing: Routing<T>, into dLogits: Tensor<T>) {
    for j in 0..<routing.count {
        let alpha = routing.weights[j]
        dLogits[Int(routing.tokens[j]), Int(routing.experts[j])] += dWeights[j] * alpha * (1 - alpha)
    }
}
