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
    public static func solve(scores: [Double], tokens: Int, experts: Int, epsilon: Double) -> [Int] {
        precondition(tokens % experts == 0, "balanced assignment needs N divisible by E")
        precondition(scores.count == tokens * experts)
        guard tokens > 0 else { return [] }
        let low = scores.filter(\.isFinite).min() ?? 0
        // Non-finite scores count as the worst.
        let units = scores.map { Int64((($0.isFinite ? $0 : low) / resolution).rounded()) }
        let step = max(1, Int64((epsilon / resolution).rounded()))
        let perExpert = tokens / experts
        var price = [Int64](repeating: 0, count: tokens)
        var owner = [Int](repeating: -1, count: tokens)
        var free = [Int](repeating: perExpert, count: experts)
        var expert = 0
        while true {
            // The lowest-index expert with a free slot bids.
            if let next = (0..<experts).first(where: { free[$0] > 0 }) { expert = next } else { break }
            var best = -1, bestValue = Int64.min, secondValue = Int64.min
            for s in 0..<tokens {
                let value = units[s * experts + expert] - price[s]
                if value > bestValue { secondValue = bestValue; bestValue = value; best = s } else if value > secondValue { secondValue = value }
            }
            price[best] += (secondValue == Int64.min ? 0 : bestValue - secondValue) + step
            if owner[best] >= 0 { free[owner[best]] += 1 }
            owner[best] = expert
            free[expert] -= 1
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
        var counts = [Int64](repeating: 0, count: experts)
        for s in 0..<rows {
            let e = assigned[s]
            routing.append(token: s, expert: e, weight: sigmoid(scores[s, e]))
            counts[e] += 1
        }
        try context.communicator.allReduce(&counts)
        routing.keptPerExpert = counts
        routing.selectedCount = counts.reduce(0, +)
        routing.keptCount = routing.selectedCount
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
