/// Balanced assignment for BASE layers (ALGORITHMS.md 6): give every expert exactly N/E tokens,
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
        // Holders of each expert, as (bid, token) in a min-heap: the root is the cheapest slot.
        var holders = [[(bid: Int64, token: Int)]](repeating: [], count: experts)
        for e in 0..<experts { holders[e].reserveCapacity(slots) }
        var queue = Array(0..<tokens)
        var head = 0
        func price(_ e: Int) -> Int64 { holders[e].count < slots ? 0 : holders[e][0].bid }
        func below(_ a: (bid: Int64, token: Int), _ b: (bid: Int64, token: Int)) -> Bool { (a.bid, -a.token) < (b.bid, -b.token) }
        func siftDown(_ e: Int, _ start: Int) {
            var i = start
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < holders[e].count && below(holders[e][l], holders[e][m]) { m = l }
                if r < holders[e].count && below(holders[e][r], holders[e][m]) { m = r }
                if m == i { return }
                holders[e].swapAt(i, m)
                i = m
            }
        }
        func siftUp(_ e: Int, _ start: Int) {
            var i = start
            while i > 0 {
                let parent = (i - 1) / 2
                guard below(holders[e][i], holders[e][parent]) else { return }
                holders[e].swapAt(i, parent)
                i = parent
            }
        }
        while head < queue.count {
            let s = queue[head]
            head += 1
            var best = 0, bestValue = Int64.min, secondValue = Int64.min
            for e in 0..<experts {
                let value = units[s * experts + e] - price(e)
                if value > bestValue { secondValue = bestValue; bestValue = value; best = e } else if value > secondValue { secondValue = value }
            }
            let offer = price(best) + (secondValue == Int64.min ? 0 : bestValue - secondValue) + step
            if holders[best].count == slots {
                let evicted = holders[best][0].token
                owner[evicted] = -1
                holders[best][0] = (offer, s)
                siftDown(best, 0)
                queue.append(evicted)
            } else {
                holders[best].append((offer, s))
                siftUp(best, holders[best].count - 1)
            }
            owner[s] = best
        }
        return owner
    }
}

/// BASE layers (`base`, ALGORITHMS.md 6) in SwiftMoE's block: the MoE output is
/// α_s F_{a(s)}(x_s) with α_s = σ(x_s · c_{a(s)}), added to the residual, which equals BASE's
/// α f(x) + (1 - α) x for a residual expert f(x) = x + F(x). Training assigns the **global**
/// batch (all ranks' tokens) so every expert gets exactly N_global / E tokens and results do
/// not depend on the number of ranks; evaluation takes the greedy argmax.
/// Shapes: x [N, C], centroids [C, E], scores [N, E].
public final class BalancedGate<T: Scalar>: Gate {
    public let centroids: Parameter<T, Replicated>
    public let epsilon: Double
    public var expertCount: Int { centroids.columns }

    let scores = Tensor<T>()
    var assigned: [Int] = []          // [N] expert of each local token
    var globalScores: [Double] = []
    let dLogits = Tensor<T>()

    public init(centroids: Parameter<T, Replicated>, epsilon: Double) {
        self.centroids = centroids
        self.epsilon = epsilon
    }

    /// Orthogonal centroids with gain 0.1 (Gram-Schmidt of normal columns, keyed by seed and layer).
    public func initializeState(seed: Int, layer: Int) {
        orthogonalColumns(centroids, gain: 0.1, key: RandomKey(UInt64(seed)).derive("centroids").derive(layer))
    }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount
        routing.reset(expertCount: experts)
        routing.globalTokens = context.globalTokens
        scores.resize(rows: rows, columns: experts)
        gemm(m: rows, n: experts, k: centroids.rows, a: x, b: centroids.value, c: scores.pointer)   // A = X C
        if assigned.count != rows { assigned = Array(repeating: 0, count: rows) }
        if context.training {
            // Every rank solves the same global problem: rows padded to a multiple of E with
            // constant-score dummies whose assignments are discarded.
            let padded = (context.globalTokens + experts - 1) / experts * experts
            if globalScores.count != padded * experts { globalScores = Array(repeating: 0, count: padded * experts) }
            for index in globalScores.indices { globalScores[index] = 0 }
            for s in 0..<rows { for e in 0..<experts { globalScores[(context.firstGlobalToken + s) * experts + e] = Double(scores[s, e]) } }
            try context.communicator.allReduce(&globalScores)
            let owners = BalancedAssignment.solve(scores: globalScores, tokens: padded, experts: experts, epsilon: epsilon)
            for s in 0..<rows { assigned[s] = owners[context.firstGlobalToken + s] }
        } else {
            for s in 0..<rows {
                var best = 0
                for e in 1..<experts where scores[s, e] > scores[s, best] { best = e }
                assigned[s] = best
            }
        }
        for s in 0..<rows { routing.append(token: s, expert: assigned[s], weight: sigmoid(scores[s, assigned[s]])) }
        try routing.recordGlobalCounts(communicator: context.communicator)
    }

    /// w = α = σ(A[s, a]): dA[s, a] = dw α (1 - α); the assignment itself is constant.
    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        dLogits.resize(rows: rows, columns: expertCount, zero: true)
        for j in 0..<routing.count {
            let s = Int(routing.tokens[j]), e = Int(routing.experts[j]), alpha = routing.weights[j]
            dLogits[s, e] = dWeights[j] * alpha * (1 - alpha)
        }
        routerBackward(centroids, input: x, dLogits: dLogits.pointer, rows: rows, dx: dx)
    }
}

/// Fills `parameter` [rows, columns] with orthonormal columns (times `gain`): Gram-Schmidt on
/// normal draws. Needs columns <= rows.
func orthogonalColumns<T: Scalar>(_ parameter: Parameter<T, Replicated>, gain: Double, key: RandomKey) {
    let rows = parameter.rows, columns = parameter.columns
    var basis: [[Double]] = []
    for column in 0..<columns {
        var v = (0..<rows).map { key.derive(column).normal($0) }
        for previous in basis {
            let projection = zip(v, previous).reduce(0) { $0 + $1.0 * $1.1 }
            for i in 0..<rows { v[i] -= projection * previous[i] }
        }
        let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
        basis.append(v.map { $0 / max(norm, 1e-12) })
    }
    for column in 0..<columns { for row in 0..<rows { parameter.value[row * columns + column] = T(gain * basis[column][row]) } }
}
