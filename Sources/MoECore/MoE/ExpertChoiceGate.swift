/// Expert-choice routing (`expert_choice`, ALGORITHMS.md 8): S = softmax(X W_g); each expert
/// takes its C = min(N, ceil(N c / E)) highest-scoring tokens of the **global** batch (ties:
/// lower global index) with weight S; a token may get 0 to E experts. No auxiliary loss.
/// Not causal: allowed only with `gates.allow_non_causal` (the config refuses it otherwise).
public final class ExpertChoiceGate<T: Scalar>: Gate {
    public let router: Parameter<T, Replicated>
    public let capacityFactor: Double
    public var expertCount: Int { router.columns }

    let probabilities = Tensor<T>()
    var globalScores: [Double] = []
    var keptIndex: [Int32] = []     // [N, E]
    let dLogits = Tensor<T>()

    public init(router: Parameter<T, Replicated>, capacityFactor: Double) {
        self.router = router
        self.capacityFactor = capacityFactor
    }

    public func capacity(globalTokens: Int) -> Int {
        min(globalTokens, Int((Double(globalTokens) * capacityFactor / Double(expertCount)).rounded(.up)))
    }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount, total = context.globalTokens
        routing.reset(expertCount: experts)
        routing.globalTokens = total
        probabilities.resize(rows: rows, columns: experts)
        gemm(m: rows, n: experts, k: router.rows, a: x, b: router.value, c: probabilities.pointer)
        for s in 0..<rows { Kernels.softmaxRow(probabilities.row(s), count: experts) }
        if globalScores.count != total * experts { globalScores = Array(repeating: 0, count: total * experts) }
        for index in globalScores.indices { globalScores[index] = 0 }
        for s in 0..<rows { for e in 0..<experts { globalScores[(context.firstGlobalToken + s) * experts + e] = Double(probabilities[s, e]) } }
        try context.communicator.allReduce(&globalScores)
        // Every rank ranks the same global scores, then keeps its own tokens' picks.
        let capacity = capacity(globalTokens: total)
        var chosen = [Bool](repeating: false, count: rows * experts)
        for e in 0..<experts {
            let order = (0..<total).sorted { (globalScores[$0 * experts + e], -$0) > (globalScores[$1 * experts + e], -$1) }
            for token in order.prefix(capacity) where token >= context.firstGlobalToken && token < context.firstGlobalToken + rows {
                chosen[(token - context.firstGlobalToken) * experts + e] = true
            }
            routing.keptPerExpert[e] = Int64(capacity)
        }
        if keptIndex.count != rows * experts { keptIndex = Array(repeating: -1, count: rows * experts) }
        for s in 0..<rows {
            for e in 0..<experts {
                keptIndex[s * experts + e] = -1
                guard chosen[s * experts + e] else { continue }
                keptIndex[s * experts + e] = Int32(routing.count)
                routing.append(token: s, expert: e, weight: probabilities[s, e])
            }
        }
        routing.selectedCount = Int64(capacity * experts)
        routing.keptCount = routing.selectedCount
    }

    /// dS = dw on the chosen pairs, then the per-token softmax backward.
    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        let experts = expertCount
        dLogits.resize(rows: rows, columns: experts, zero: true)
        for s in 0..<rows {
            let dl = dLogits.row(s)
            for e in 0..<experts where keptIndex[s * experts + e] >= 0 { dl[e] = dWeights[Int(keptIndex[s * experts + e])] }
            Kernels.softmaxBackwardRow(probabilities: probabilities.row(s), dl, count: experts)
        }
        routerBackward(router, input: x, dLogits: dLogits.pointer, rows: rows, dx: dx)
    }
}

/// ReLU routing (`relu`, ALGORITHMS.md 9.1, ReMoE): w = ReLU(x W_g) on every positive pair; no
/// softmax, top-k or capacity. Sparsity comes from the L1 term λ (1/N) Σ f_e r_{s,e}, with
/// f_e = E n_e / (k N) over the global batch, averaged over the MoE layers, and λ adapted after
/// every update towards a target fraction of zero weights (`adapt`).
public final class ReLUGate<T: Scalar>: Gate {
    public let router: Parameter<T, Replicated>
    public let targetActive: Int
    public let multiplier: Double
    public let targetSparsity: Double
    /// How many MoE layers share the regulariser (it is averaged over them).
    public let layerCount: Int
    public var lambda: Double
    public var expertCount: Int { router.columns }

    let logits = Tensor<T>()
    var keptIndex: [Int32] = []
    var fraction: [T] = []            // f_e, constant in backward
    var statistics: [Double] = []     // n_e (E values), Σ_s r_{s,e} (E values)
    var globalTokens = 0
    let dLogits = Tensor<T>()

    public init(router: Parameter<T, Replicated>, targetActive: Int, initialLambda: Double, multiplier: Double,
                targetSparsity: Double, layerCount: Int) {
        self.router = router
        self.targetActive = targetActive
        self.lambda = initialLambda
        self.multiplier = multiplier
        self.targetSparsity = targetSparsity > 0 ? targetSparsity : 1 - Double(targetActive) / Double(router.columns)
        self.layerCount = max(1, layerCount)
    }

    public var state: [String: Double] {
        get { ["lambda": lambda] }
        set { if let value = newValue["lambda"] { lambda = value } }
    }

    var coefficient: Double { lambda / Double(layerCount) }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        let experts = expertCount
        routing.reset(expertCount: experts)
        routing.globalTokens = context.globalTokens
        globalTokens = context.globalTokens
        logits.resize(rows: rows, columns: experts)
        gemm(m: rows, n: experts, k: router.rows, a: x, b: router.value, c: logits.pointer)
        if keptIndex.count != rows * experts { keptIndex = Array(repeating: -1, count: rows * experts) }
        if statistics.count != 2 * experts { statistics = Array(repeating: 0, count: 2 * experts); fraction = Array(repeating: 0, count: experts) }
        for index in statistics.indices { statistics[index] = 0 }
        for s in 0..<rows {
            for e in 0..<experts {
                let r = logits[s, e]
                keptIndex[s * experts + e] = -1
                guard r > 0 else { continue }
                keptIndex[s * experts + e] = Int32(routing.count)
                routing.append(token: s, expert: e, weight: r)
                statistics[e] += 1
                statistics[experts + e] += Double(r)
            }
        }
        try context.communicator.allReduce(&statistics)
        let n = Double(context.globalTokens)
        var regulariser = 0.0
        for e in 0..<experts {
            let active = Int64(statistics[e])
            routing.keptPerExpert[e] = active
            routing.selectedCount += active
            routing.keptCount += active
            let f = Double(experts) * statistics[e] / (Double(targetActive) * n)
            fraction[e] = T(f)
            regulariser += f * statistics[experts + e] / n
        }
        routing.auxiliaryLoss = context.training ? coefficient * regulariser : 0
    }

    /// dr = dw + (λ/L) f_e / N on active pairs; dl = dr ⊙ 1[l > 0].
    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        let experts = expertCount
        let scale = T(coefficient / Double(globalTokens))
        dLogits.resize(rows: rows, columns: experts, zero: true)
        for s in 0..<rows {
            for e in 0..<experts where keptIndex[s * experts + e] >= 0 {
                dLogits[s, e] = dWeights[Int(keptIndex[s * experts + e])] + scale * fraction[e]
            }
        }
        routerBackward(router, input: x, dLogits: dLogits.pointer, rows: rows, dx: dx)
    }

    /// The controller, once per update: sparsity below target means too many active experts,
    /// so the penalty grows; above target it shrinks.
    public func adapt(sparsity: Double) {
        if sparsity < targetSparsity { lambda *= multiplier } else if sparsity > targetSparsity { lambda /= multiplier }
    }
}
