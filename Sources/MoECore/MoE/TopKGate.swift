import MoEComm

/// How top-k weights are normalised (ALGORITHMS.md 2.1).
public enum Renormalization: String, CaseIterable, Sendable {
    /// w = p on the selected experts (Switch).
    case none
    /// w = softmax over the selected logits; dropping leaves siblings unchanged (Megatron).
    case beforeDrop = "before_drop"
    /// w = p / Σ kept p (GShard).
    case afterDrop = "after_drop"
}

/// How `gshard` picks each token's second expert (ALGORITHMS.md 2.3).
public enum SecondChoicePolicy: String, CaseIterable, Sendable {
    /// argmax over the other experts of l + Gumbel noise: a draw from their softmax.
    case sampling
    case argmax
    /// The runner-up, kept only with probability 2 p2 / (p1 + p2) (original GShard).
    case random
}

/// Softmax top-k router with capacity (ALGORITHMS.md 2-3): `topk`, `switch` and `gshard`.
///
/// Slots follow the GShard order, computed over the global batch: all first choices before any
/// second choice, and within a choice rank by global token index (rank r's tokens after those
/// of ranks below r). So capacity decisions, and results, do not depend on the number of ranks.
/// Shapes: x [N, C], router [C, E], probabilities [N, E], selections [N, k].
public final class TopKGate<T: Scalar>: Gate {
    public let router: Parameter<T, Replicated>
    public let expertCount: Int
    public let k: Int
    public let renormalization: Renormalization
    /// nil: dropless (every selected assignment is processed).
    public let capacityFactor: Double?
    public let evalCapacityFactor: Double?
    public let minimumCapacity: Int
    public let balanceCoefficient: Double
    public let zLossCoefficient: Double
    /// gshard: how the second expert is chosen; its balance fractions count first choices only.
    public let secondChoice: SecondChoicePolicy?
    /// Router input jitter ε (training only): the router sees x ⊙ U(1-ε, 1+ε).
    public let jitter: Double

    // Forward cache.
    let probabilities = Tensor<T>()
    var logSumExp: [T] = []
    var selectedExpert: [Int32] = []       // [N, k]
    var selectedWeight: [T] = []           // [N, k]: weights before dropping (renormalised modes)
    var keptIndex: [Int32] = []            // [N, k]: index into routing, or -1 if dropped
    var balanceFraction: [T] = []          // f_e over the global batch (constant in backward)
    var globalTokens = 0
    // Scratch.
    var localCounts: [Int64] = []          // [k, E] per choice rank and expert
    var countsBefore: [Int64] = []
    var countsTotal: [Int64] = []
    var running: [Int64] = []              // next free slot per (choice rank, expert)
    var statistics: [Double] = []          // Σ_s p_{s,e} (E values), Σ_s lse_s², Σ_s entropy(p_s)
    let dLogits = Tensor<T>()
    // Jitter: the router's input x ⊙ u and the factors u, [N, C] each; dx scratch.
    let jitteredInput = Tensor<T>(), jitterFactors = Tensor<T>(), dRouterInput = Tensor<T>()
    var jittered = false

    public init(router: Parameter<T, Replicated>, k: Int, renormalization: Renormalization,
                capacityFactor: Double?, evalCapacityFactor: Double?, minimumCapacity: Int,
                balanceCoefficient: Double, zLossCoefficient: Double, secondChoice: SecondChoicePolicy? = nil,
                jitter: Double = 0) {
        precondition(k >= 1 && k <= router.columns, "top_k must be between 1 and the number of experts")
        precondition(secondChoice == nil || k == 2, "gshard routes to two experts")
        self.secondChoice = secondChoice
        self.jitter = jitter
        self.router = router
        self.expertCount = router.columns
        self.k = k
        self.renormalization = renormalization
        self.capacityFactor = capacityFactor
        self.evalCapacityFactor = evalCapacityFactor
        self.minimumCapacity = minimumCapacity
        self.balanceCoefficient = balanceCoefficient
        self.zLossCoefficient = zLossCoefficient
    }

    /// Slots per expert over the global batch: min(N, max(C_min, ceil(k * CF * N / E))).
    public func capacity(globalTokens: Int, training: Bool) -> Int? {
        guard let factor = training ? capacityFactor : evalCapacityFactor else { return nil }
        let raw = Int((Double(k) * factor * Double(globalTokens) / Double(expertCount)).rounded(.up))
        return min(globalTokens, max(minimumCapacity, raw))
    }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount
        routing.reset(expertCount: experts)
        globalTokens = context.globalTokens
        probabilities.resize(rows: rows, columns: experts)
        // 1. logits = x W_g, then p = softmax(l) row by row (lse kept for the z-loss).
        let width = router.rows
        jittered = context.training && jitter > 0
        var routerInput = x
        if jittered {
            jitteredInput.resize(rows: rows, columns: width)
            jitterFactors.resize(rows: rows, columns: width)
            let key = context.noiseKey.derive("jitter")
            for s in 0..<rows {
                let stream = key.derive(context.firstGlobalToken + s)
                for c in 0..<width {
                    let u = T(1 + jitter * (2 * stream.uniform(c) - 1))
                    jitterFactors[s, c] = u
                    jitteredInput[s, c] = x[s * width + c] * u
                }
            }
            routerInput = UnsafePointer(jitteredInput.pointer)
        }
        gemm(m: rows, n: experts, k: width, a: routerInput, b: router.value, c: probabilities.pointer)
        resizeCaches(rows: rows)
        for index in statistics.indices { statistics[index] = 0 }
        for s in 0..<rows {
            let p = probabilities.row(s)
            let lse = Kernels.softmaxRow(p, count: experts)
            logSumExp[s] = lse
            statistics[experts] += Double(lse * lse)
            for e in 0..<experts {
                statistics[e] += Double(p[e])
                if p[e] > 0 { statistics[experts + 1] -= Double(p[e]) * _log(Double(p[e])) }
            }
        }
        // 2. The k largest probabilities per token (ties: lowest expert index).
        for index in localCounts.indices { localCounts[index] = 0 }
        let gumbelKey = context.noiseKey.derive("gumbel")
        for s in 0..<rows {
            let p = probabilities.row(s)
            var sum: T = 0
            for c in 0..<k {
                var best = -1
                if c == 1, let policy = secondChoice, policy == .sampling, context.training {
                    // argmax over the others of log p + g (= l + g up to a shared shift).
                    let stream = gumbelKey.derive(context.firstGlobalToken + s)
                    var bestScore = -Double.infinity
                    for e in 0..<experts where e != Int(selectedExpert[s * k]) {
                        let score = Double(_logFloat(p[e])) + stream.gumbel(e)
                        if score > bestScore { bestScore = score; best = e }
                    }
                } else {
                    for e in 0..<experts where !isSelected(e, token: s, upTo: c) {
                        if best < 0 || p[e] > p[best] { best = e }
                    }
                }
                if c == 1, secondChoice == .random, context.training {
                    let first = p[Int(selectedExpert[s * k])]
                    let u = gumbelKey.derive(context.firstGlobalToken + s).uniform(experts)
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
        // 3. Global slot offsets: ranks below this one, and all earlier choice ranks.
        if countsBefore.count != localCounts.count {
            countsBefore = localCounts; countsTotal = localCounts; running = localCounts
        }
        for index in localCounts.indices { countsBefore[index] = localCounts[index]; countsTotal[index] = localCounts[index] }
        try countsBefore.withUnsafeMutableBufferPointer { try context.communicator.exclusiveScanSum($0) }
        try context.communicator.allReduce(&countsTotal)
        try context.communicator.allReduce(&statistics)

        // 4. Keep assignments whose slot is below capacity; weights; routing list.
        let capacity = capacity(globalTokens: context.globalTokens, training: context.training) ?? Int.max
        for index in countsBefore.indices { running[index] = countsBefore[index] }
        for c in 1..<k {
            for e in 0..<experts { running[c * experts + e] += (0..<c).reduce(0) { $0 + countsTotal[$1 * experts + e] } }
        }
        for s in 0..<rows {
            var keptSum: T = 0
            for c in 0..<k {
                let e = Int(selectedExpert[s * k + c])
                guard e >= 0 else { keptIndex[s * k + c] = -1; continue }
                let slot = running[c * experts + e]
                running[c * experts + e] += 1
                let kept = slot < Int64(capacity)
                keptIndex[s * k + c] = kept ? 0 : -1
                if kept { keptSum += probabilities[s, e] }
            }
            for c in 0..<k where keptIndex[s * k + c] >= 0 {
                let e = Int(selectedExpert[s * k + c])
                if renormalization == .afterDrop {
                    selectedWeight[s * k + c] = probabilities[s, e] / max(keptSum, T(1.19e-7))
                }
                keptIndex[s * k + c] = Int32(routing.count)
                routing.append(token: s, expert: e, weight: selectedWeight[s * k + c])
            }
        }

        // 5. Statistics and auxiliary losses over the global batch (ALGORITHMS.md 3).
        let n = Double(context.globalTokens)
        var balance = 0.0
        for e in 0..<experts {
            var selected: Int64 = 0, kept: Int64 = 0
            var slotsBefore: Int64 = 0
            for c in 0..<k {
                let total = countsTotal[c * experts + e]
                selected += total
                kept += max(0, min(total, Int64(capacity) - slotsBefore))
                slotsBefore += total
            }
            routing.keptPerExpert[e] = kept
            routing.selectedCount += selected
            routing.keptCount += kept
            // f_e: selections per expert over k N (gshard: first choices over N).
            let fraction = secondChoice == nil ? Double(selected) / (Double(k) * n) : Double(countsTotal[e]) / n
            balanceFraction[e] = T(fraction)
            balance += fraction * statistics[e] / n
        }
        balance *= Double(experts)
        let zLoss = statistics[experts] / n
        routing.auxiliaryLoss = balanceCoefficient * balance + zLossCoefficient * zLoss
        routing.routerEntropy = statistics[experts + 1] / n
        routing.globalTokens = context.globalTokens
    }

    @inline(__always)
    private func isSelected(_ expert: Int, token: Int, upTo choice: Int) -> Bool {
        for c in 0..<choice where selectedExpert[token * k + c] == Int32(expert) { return true }
        return false
    }

    private func resizeCaches(rows: Int) {
        if logSumExp.count != rows { logSumExp = Array(repeating: 0, count: rows) }
        if selectedExpert.count != rows * k {
            selectedExpert = Array(repeating: 0, count: rows * k)
            selectedWeight = Array(repeating: 0, count: rows * k)
            keptIndex = Array(repeating: 0, count: rows * k)
        }
        if localCounts.count != k * expertCount { localCounts = Array(repeating: 0, count: k * expertCount) }
        if balanceFraction.count != expertCount { balanceFraction = Array(repeating: 0, count: expertCount) }
        if statistics.count != expertCount + 2 { statistics = Array(repeating: 0, count: expertCount + 2) }
    }

    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        let experts = expertCount
        let n = T(globalTokens)
        dLogits.resize(rows: rows, columns: experts, zero: true)
        let balanceScale = T(balanceCoefficient) * T(experts) / n
        let zScale = T(zLossCoefficient) * 2 / n
        for s in 0..<rows {
            let p = probabilities.row(s), dl = dLogits.row(s)
            // Gradient reaching the full softmax p: task term (mode none) and balance term.
            for e in 0..<experts { dl[e] = balanceScale * balanceFraction[e] }
            switch renormalization {
            case .none:
                for c in 0..<k where keptIndex[s * k + c] >= 0 {
                    dl[Int(selectedExpert[s * k + c])] += dWeights[Int(keptIndex[s * k + c])]
                }
                Kernels.softmaxBackwardRow(probabilities: p, dl, count: experts)
            case .beforeDrop, .afterDrop:
                Kernels.softmaxBackwardRow(probabilities: p, dl, count: experts)
                // w = softmax over the normalising set K: dl_j += w_j (dw_j - Σ_K w_i dw_i).
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
            if zLossCoefficient != 0 {
                for e in 0..<experts { dl[e] += zScale * logSumExp[s] * p[e] }
            }
        }
        guard jittered else {
            routerBackward(router, input: x, dLogits: dLogits.pointer, rows: rows, dx: dx)
            return
        }
        // With jitter the router saw x' = x ⊙ u: dW_g += x'ᵀ dl, dx += (dl W_gᵀ) ⊙ u.
        let width = router.rows
        dRouterInput.resize(rows: rows, columns: width, zero: true)
        routerBackward(router, input: jitteredInput.pointer, dLogits: dLogits.pointer, rows: rows, dx: dRouterInput.pointer)
        for index in 0..<rows * width { dx[index] += dRouterInput.pointer[index] * jitterFactors.pointer[index] }
    }
}

/// logits = x W_g (x: [N, C], W_g: [C, E]): dW_g += xᵀ dl, dx += dl W_gᵀ.
func routerBackward<T: Scalar>(_ router: Parameter<T, Replicated>, input x: UnsafePointer<T>, dLogits: UnsafePointer<T>,
                               rows: Int, dx: UnsafeMutablePointer<T>) {
    let experts = router.columns
    gemm(transposeA: true, m: router.rows, n: experts, k: rows, a: x, b: dLogits, beta: 1, c: router.gradient)
    gemm(transposeB: true, m: rows, n: router.rows, k: experts, a: dLogits, b: router.value, beta: 1, c: dx)
}

@inline(__always) func _logFloat<T: Scalar>(_ x: T) -> T { T(_log(Double(x))) }
