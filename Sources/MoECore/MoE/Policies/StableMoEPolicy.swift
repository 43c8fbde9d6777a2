import MoEComm

/// StableMoE's policy (`stablemoe`, docs/ALGORITHMS.md 7), in SwiftMoE's block like BASE: output
/// α F_a(x) with α = σ(A[s, a]), A = X C the centroid scores (the router's logits).
///
/// Stage 1 (t < T_2, training): greedy top-1 on A (constant for routing), while a distilled router
/// (table D [V, d'] and centroids Ĉ [d', E]) learns to predict that choice from the token id alone
/// (`DistillationLoss`). Stage 2 and every evaluation: a(s) = argmax_e (D[v_s] Ĉ)_e, a fixed
/// function of the token id; D and Ĉ are frozen. Capacity ceil(CF N / E) over the global batch,
/// in global token order; overflow skips the experts (residual only).
public final class StableMoEPolicy<T: Scalar>: SelectionPolicy {
    public let expertCount: Int
    public let distilledTable: Parameter<T, Replicated>
    public let distilledCentroids: Parameter<T, Replicated>
    public let stage2Step: Int
    public let capacityFactor: Double
    public var drops: Bool { true }

    /// Distilled logits D[v] Ĉ [N, E] (after the distillation loss's forward: its probabilities).
    let distilled = Tensor<T>()
    /// a(s) before capacity, and argmax_e A (the distillation target), per local token.
    public internal(set) var choice: [Int] = []
    var target: [Int32] = []
    var tokenIds: [Int32] = []
    var stage1 = false
    var before: [Int64] = [], total: [Int64] = []

    public init(expertCount: Int, distilledTable: Parameter<T, Replicated>, distilledCentroids: Parameter<T, Replicated>,
                stage2Step: Int, capacityFactor: Double) {
        self.expertCount = expertCount
        self.distilledTable = distilledTable
        self.distilledCentroids = distilledCentroids
        self.stage2Step = stage2Step
        self.capacityFactor = capacityFactor
    }

    public func initializeState(seed: Int, layer: Int) {
        orthogonalColumns(distilledCentroids, gain: 0.1, key: StableMoEPolicy.key(seed: seed, layer: layer).derive(1))
    }

    /// The key of this layer's orthogonal initialisations (the centroids use derive(0)).
    static func key(seed: Int, layer: Int) -> RandomKey { RandomKey(UInt64(seed)).derive("stablemoe").derive(layer) }

    public func isStage2(step: Int) -> Bool { step >= stage2Step }
    public func phase(step: Int) -> TrainingPhase { isStage2(step: step) ? .stage2 : .stage1 }

    /// Stage 2 freezes the distilled router (no updates, no weight decay).
    public func frozenParameters(step: Int) -> [(parameter: Parameter<T, Replicated>, frozen: Bool)] {
        [(distilledTable, isStage2(step: step)), (distilledCentroids, isStage2(step: step))]
    }

    @_specialize(where T == Float)
    public func select(_ scores: RouterScores<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        guard let ids = context.tokenIds else { preconditionFailure("stablemoe needs the token ids") }
        let experts = expertCount, width = distilledTable.columns, a = scores.logits
        stage1 = context.training && !isStage2(step: context.step)
        tokenIds.removeAll(keepingCapacity: true)
        tokenIds.append(contentsOf: UnsafeBufferPointer(start: ids, count: rows))
        distilled.resize(rows: rows, columns: experts)
        for s in 0..<rows {
            gemm(m: 1, n: experts, k: width, a: distilledTable.value + Int(ids[s]) * width, b: distilledCentroids.value,
                 c: distilled.row(s))
        }
        if choice.count != rows { choice = Array(repeating: 0, count: rows); target = Array(repeating: 0, count: rows) }
        for s in 0..<rows {
            var best = 0, distilledBest = 0
            for e in 1..<experts {
                if a[s, e] > a[s, best] { best = e }
                if distilled[s, e] > distilled[s, distilledBest] { distilledBest = e }
            }
            target[s] = Int32(best)
            choice[s] = stage1 ? best : distilledBest
            routing.selectedPerExpert[choice[s]] += 1
        }
        try keepWithinCapacity(rows: rows, scores: a, context: context, routing: routing)
    }

    /// Slots in global token order: this rank's first slot per expert is the count on the ranks
    /// before it.
    private func keepWithinCapacity(rows: Int, scores a: Tensor<T>, context: RoutingContext, routing: Routing<T>) throws {
        before = routing.selectedPerExpert
        try before.withUnsafeMutableBufferPointer { try context.communicator.exclusiveScanSum($0) }
        let capacity = context.dropless ? Int64.max
            : Int64((capacityFactor * Double(context.globalTokens) / Double(expertCount)).rounded(.up))
        for s in 0..<rows {
            let e = choice[s]
            let slot = before[e]
            before[e] += 1
            if slot < capacity { routing.append(token: s, expert: e, weight: sigmoid(a[s, e])) }
        }
    }

    @_specialize(where T == Float)
    public func backward(_ dWeights: UnsafePointer<T>, routing: Routing<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {
        sigmoidWeightsBackward(dWeights, routing: routing, into: dLogits)
    }
}

/// StableMoE's stage-1 balance loss (coefficient/N) Σ_s ((|A_e| - n̄)/n̄) σ(A[s, e]) at e = a(s),
/// over every token (dropped ones too), with |A_e| the global selections of e and n̄ = N/E.
/// Summed per expert, so this rank's share needs no global count: Σ_e scale_e S_e.
public final class StableBalanceLoss<T: Scalar>: AuxiliaryLoss {
    public let coefficient: Double
    let policy: StableMoEPolicy<T>
    var balanceScale: [Double]

    public init(coefficient: Double, policy: StableMoEPolicy<T>) {
        self.coefficient = coefficient
        self.policy = policy
        balanceScale = Array(repeating: 0, count: policy.expertCount)
    }

    public var sumCount: Int { balanceScale.count }

    @_specialize(where T == Float)
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        guard policy.stage1 else { return }
        for s in 0..<input.rows { sums[policy.choice[s]] += Double(sigmoid(input.scores.logits[s, policy.choice[s]])) }
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double {
        guard policy.stage1 else { return 0 }
        let n = input.tokens, mean = n / Double(balanceScale.count)
        var total = 0.0
        for e in balanceScale.indices {
            balanceScale[e] = (Double(input.routing.globalSelectedPerExpert[e]) - mean) / mean
            total += balanceScale[e] * sums[e]
        }
        return coefficient * total / n
    }

    @_specialize(where T == Float)
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        guard policy.stage1 else { return }
        for s in 0..<input.rows {
            let e = policy.choice[s], sigma = sigmoid(input.scores.logits[s, e])
            dLogits[s, e] += T(coefficient * input.weight * balanceScale[e] / input.tokens) * sigma * (1 - sigma)
        }
    }
}

/// StableMoE's stage-1 distillation (coefficient/N) Σ_s CE(softmax(D[v_s] Ĉ), argmax_e A[s, e]):
/// the distilled router learns the centroid routing. Its gradient reaches D and Ĉ only.
public final class DistillationLoss<T: Scalar>: AuxiliaryLoss {
    public let coefficient: Double
    let policy: StableMoEPolicy<T>

    public init(coefficient: Double, policy: StableMoEPolicy<T>) {
        self.coefficient = coefficient
        self.policy = policy
    }

    public var sumCount: Int { 1 }

    /// Σ_s CE; the distilled rows become their probabilities (kept for the backward).
    @_specialize(where T == Float)
    public func accumulate(_ input: LossInput<T>, into sums: UnsafeMutablePointer<Double>) {
        guard policy.stage1 else { return }
        for s in 0..<input.rows {
            let row = policy.distilled.row(s), targetLogit = row[Int(policy.target[s])]
            sums[0] += Double(Kernels.softmaxRow(row, count: policy.expertCount) - targetLogit)
        }
    }

    public func value(_ input: LossInput<T>, sums: UnsafePointer<Double>) -> Double {
        policy.stage1 ? coefficient * sums[0] / input.tokens : 0
    }

    /// d logits = coefficient/N (p - onehot), into D[v] and Ĉ.
    @_specialize(where T == Float)
    public func backward(_ input: LossInput<T>, dWeights: UnsafeMutablePointer<T>, dLogits: Tensor<T>) {
        guard policy.stage1 else { return }
        let experts = policy.expertCount, width = policy.distilledTable.columns, scale = T(coefficient * input.weight / input.tokens)
        for s in 0..<input.rows {
            let dRow = policy.distilled.row(s)
            dRow[Int(policy.target[s])] -= 1
            for e in 0..<experts { dRow[e] *= scale }
            let id = Int(policy.tokenIds[s])
            gemm(transposeA: true, m: width, n: experts, k: 1, a: policy.distilledTable.value + id * width, lda: width, b: dRow,
                 beta: 1, c: policy.distilledCentroids.gradient)
            gemm(transposeB: true, m: 1, n: width, k: experts, a: dRow, b: policy.distilledCentroids.value, beta: 1,
                 c: policy.distilledTable.gradient + id * width)
        }
    }
}
