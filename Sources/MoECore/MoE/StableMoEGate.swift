/// StableMoE (`stablemoe`, ALGORITHMS.md 7), in SwiftMoE's block like BASE: output α F_a(x)
/// with α = σ(x · c_a).
///
/// Stage 1 (t < T_2, training): greedy top-1 on the centroid scores A = X C (constant for
/// routing); balance loss 0.3/N Σ_e ((|A_e| - n̄)/n̄) Σ_{j∈A_e} σ(A_{j,e}) with n̄ = N/E; and a
/// distilled router (table D [V, d'] and centroids Ĉ [d', E]) learns to predict the routing from
/// the token id alone, loss 0.3/N Σ_j CE(softmax(D_{v_j} Ĉ), argmax_e A_{j,e}).
/// Stage 2 and every evaluation: a(j) = argmax_e (D_{v_j} Ĉ)_e, fixed per token id; D and Ĉ are
/// frozen by the trainer. Capacity ceil(CF N / E) over the global batch, in global token order;
/// overflow skips the experts (residual only).
public final class StableMoEGate<T: Scalar>: Gate {
    public let centroids: Parameter<T, Replicated>
    public let distilledTable: Parameter<T, Replicated>
    public let distilledCentroids: Parameter<T, Replicated>
    public let stage2Step: Int
    public let capacityFactor: Double
    public let balanceCoefficient: Double
    public let distillCoefficient: Double
    public var expertCount: Int { centroids.columns }

    let scores = Tensor<T>(), distilled = Tensor<T>()
    var choice: [Int] = []                // a(j) before capacity
    var target: [Int32] = []              // argmax_e A (distillation target)
    var balanceScale: [Double] = []       // (|A_e| - n̄)/n̄
    var stage1 = false
    var globalTokens = 0
    var tokenIds: [Int32] = []
    let dScores = Tensor<T>()

    public init(centroids: Parameter<T, Replicated>, distilledTable: Parameter<T, Replicated>,
                distilledCentroids: Parameter<T, Replicated>, stage2Step: Int, capacityFactor: Double,
                balanceCoefficient: Double, distillCoefficient: Double) {
        self.centroids = centroids
        self.distilledTable = distilledTable
        self.distilledCentroids = distilledCentroids
        self.stage2Step = stage2Step
        self.capacityFactor = capacityFactor
        self.balanceCoefficient = balanceCoefficient
        self.distillCoefficient = distillCoefficient
    }

    public func initializeState(seed: Int, layer: Int) {
        let key = RandomKey(UInt64(seed)).derive("stablemoe").derive(layer)
        orthogonalColumns(centroids, gain: 0.1, key: key.derive(0))
        orthogonalColumns(distilledCentroids, gain: 0.1, key: key.derive(1))
    }

    public func isStage2(step: Int) -> Bool { step >= stage2Step }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        guard let ids = context.tokenIds else { preconditionFailure("stablemoe needs the token ids") }
        let experts = expertCount, width = distilledTable.columns
        routing.reset(expertCount: experts)
        routing.globalTokens = context.globalTokens
        globalTokens = context.globalTokens
        stage1 = context.training && !isStage2(step: context.step)
        tokenIds = Array(UnsafeBufferPointer(start: ids, count: rows))
        scores.resize(rows: rows, columns: experts)
        gemm(m: rows, n: experts, k: centroids.rows, a: x, b: centroids.value, c: scores.pointer)
        // Distilled logits D[v] Ĉ, row by row from the table.
        distilled.resize(rows: rows, columns: experts)
        for s in 0..<rows {
            gemm(m: 1, n: experts, k: width, a: distilledTable.value + Int(ids[s]) * width, b: distilledCentroids.value,
                 c: distilled.row(s))
        }
        if choice.count != rows { choice = Array(repeating: 0, count: rows); target = Array(repeating: 0, count: rows) }
        var counts = [Int64](repeating: 0, count: experts)
        for s in 0..<rows {
            var best = 0, distilledBest = 0
            for e in 1..<experts {
                if scores[s, e] > scores[s, best] { best = e }
                if distilled[s, e] > distilled[s, distilledBest] { distilledBest = e }
            }
            target[s] = Int32(best)
            choice[s] = stage1 ? best : distilledBest
            counts[choice[s]] += 1
        }
        // Capacity over the global batch in global token order.
        var before = counts, total = counts
        try before.withUnsafeMutableBufferPointer { try context.communicator.exclusiveScanSum($0) }
        try context.communicator.allReduce(&total)
        let capacity = Int64((capacityFactor * Double(context.globalTokens) / Double(experts)).rounded(.up))
        for s in 0..<rows {
            let e = choice[s]
            let slot = before[e]
            before[e] += 1
            guard slot < capacity else { continue }
            routing.append(token: s, expert: e, weight: sigmoid(scores[s, e]))
        }
        for e in 0..<experts {
            routing.keptPerExpert[e] = min(total[e], capacity)
            routing.selectedCount += total[e]
            routing.keptCount += routing.keptPerExpert[e]
        }
        guard stage1 else { routing.auxiliaryLoss = 0; return }
        // Stage-1 losses, summed over the global batch.
        let n = Double(context.globalTokens), mean = n / Double(experts)
        balanceScale = (0..<experts).map { (Double(total[$0]) - mean) / mean }
        var sums = [0.0, 0.0]   // Σ balance term, Σ distillation cross-entropy
        for s in 0..<rows {
            sums[0] += balanceScale[choice[s]] * Double(sigmoid(scores[s, choice[s]]))
            let row = distilled.row(s)
            let targetLogit = row[Int(target[s])]
            sums[1] += Double(Kernels.softmaxRow(row, count: experts) - targetLogit)   // row now holds probabilities
        }
        try context.communicator.allReduce(&sums)
        routing.auxiliaryLoss = (balanceCoefficient * sums[0] + distillCoefficient * sums[1]) / n
    }

    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        let experts = expertCount, width = distilledTable.columns, n = Double(globalTokens)
        dScores.resize(rows: rows, columns: experts, zero: true)
        for j in 0..<routing.count {
            let s = Int(routing.tokens[j]), e = Int(routing.experts[j]), alpha = routing.weights[j]
            dScores[s, e] += dWeights[j] * alpha * (1 - alpha)
        }
        if stage1 {
            for s in 0..<rows {
                let e = choice[s], sigma = sigmoid(scores[s, e])
                dScores[s, e] += T(balanceCoefficient * balanceScale[e] / n) * sigma * (1 - sigma)
                // Distillation: d logits = coefficient/N (p - onehot); reaches D[v] and Ĉ only.
                let dRow = distilled.row(s)
                dRow[Int(target[s])] -= 1
                for e in 0..<experts { dRow[e] *= T(distillCoefficient / n) }
                let table = distilledTable.value + Int(tokenIds[s]) * width
                gemm(transposeA: true, m: width, n: experts, k: 1, a: table, lda: width, b: dRow, beta: 1,
                     c: distilledCentroids.gradient)
                gemm(transposeB: true, m: 1, n: width, k: experts, a: dRow, b: distilledCentroids.value, beta: 1,
                     c: distilledTable.gradient + Int(tokenIds[s]) * width)
            }
        }
        routerBackward(centroids, input: x, dLogits: dScores.pointer, rows: rows, dx: dx)
    }
}
