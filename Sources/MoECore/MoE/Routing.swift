import MoEComm

/// Everything a gate may need besides the token vectors.
public struct RoutingContext {
    public var training: Bool
    public var communicator: Communicator
    /// Tokens in the global batch (all ranks): capacities and loss normalisers use it.
    public var globalTokens: Int
    /// Global index of this rank's first token, so noise keyed by token is rank-invariant.
    public var firstGlobalToken: Int
    /// Input token ids [N] (hash routing and StableMoE's distilled router need them).
    public var tokenIds: UnsafePointer<Int32>?
    /// Key for this layer's random draws at this step.
    public var noiseKey: RandomKey
    /// Completed optimizer updates t (schedules such as the DTS temperature read it).
    public var step: Int
    /// Weight of this forward's auxiliary losses in the step's loss: 1/A with A micro-batches
    /// per step (the step's auxiliary loss is their mean).
    public var lossWeight = 1.0
    /// Generation: no capacity, so a token's experts never depend on the other tokens of the
    /// window (incremental decoding sees one token at a time).
    public var dropless = false
    /// Tokens per sequence: rows s ..< s + sequenceLength are one sequence (sequence-wise losses).
    public var sequenceLength = 1

    public init(training: Bool, communicator: Communicator, globalTokens: Int, firstGlobalToken: Int,
                tokenIds: UnsafePointer<Int32>?, noiseKey: RandomKey, step: Int = 0) {
        self.step = step
        self.training = training
        self.communicator = communicator
        self.globalTokens = globalTokens
        self.firstGlobalToken = firstGlobalToken
        self.tokenIds = tokenIds
        self.noiseKey = noiseKey
    }
}

/// One MoE layer's routing statistics for one step, over the global batch (identical on every
/// rank). Computed once, by the gate's single all-reduce of its sums.
public struct RoutingStatistics: Sendable, Equatable {
    /// Σ of the gate's weighted auxiliary losses.
    public var auxiliaryLoss = 0.0
    /// Kept assignments per expert (what each expert processed); empty in EvoMoE's dense phase.
    public var keptPerExpert: [Int64] = []
    /// Selected assignments per expert, before capacity (the demand loss-free balancing reads).
    public var selectedPerExpert: [Int64] = []
    /// Assignments the policy selected (before capacity) and kept.
    public var selectedCount: Int64 = 0
    public var keptCount: Int64 = 0
    public var globalTokens = 0
    /// Mean entropy of the router's probabilities, for gates whose policy has them.
    public var routerEntropy: Double?

    public init() {}

    /// EvoMoE's dense phase: every token through the one dense FFN.
    public static func dense(globalTokens: Int) -> RoutingStatistics {
        var statistics = RoutingStatistics()
        statistics.globalTokens = globalTokens
        statistics.selectedCount = Int64(globalTokens)
        statistics.keptCount = Int64(globalTokens)
        return statistics
    }

    /// Fraction of the kept assignments each expert processed.
    public var expertLoad: [Double] {
        let kept = Double(max(keptCount, 1))
        return keptPerExpert.map { Double($0) / kept }
    }

    /// The statistics of a whole step from its micro-batches': counts summed, the auxiliary loss
    /// averaged (it is the mean over micro-batches), the entropy weighted by tokens.
    public static func combined(_ parts: [RoutingStatistics]) -> RoutingStatistics {
        guard var total = parts.first, parts.count > 1 else { return parts.first ?? RoutingStatistics() }
        var entropy = (total.routerEntropy ?? 0) * Double(total.globalTokens)
        for part in parts.dropFirst() {
            total.auxiliaryLoss += part.auxiliaryLoss
            for e in total.keptPerExpert.indices where e < part.keptPerExpert.count { total.keptPerExpert[e] += part.keptPerExpert[e] }
            for e in total.selectedPerExpert.indices where e < part.selectedPerExpert.count { total.selectedPerExpert[e] += part.selectedPerExpert[e] }
            total.selectedCount += part.selectedCount
            total.keptCount += part.keptCount
            total.globalTokens += part.globalTokens
            entropy += (part.routerEntropy ?? 0) * Double(part.globalTokens)
        }
        total.auxiliaryLoss /= Double(parts.count)
        if total.routerEntropy != nil { total.routerEntropy = entropy / Double(max(total.globalTokens, 1)) }
        return total
    }

    public var droppedFraction: Double { selectedCount == 0 ? 0 : 1 - Double(keptCount) / Double(selectedCount) }
    /// Mean experts processing each token.
    public var activeExperts: Double { Double(keptCount) / Double(max(globalTokens, 1)) }
}

/// What a gate decided for one MoE layer on this rank: the assignments that survive capacity,
/// in token order (then choice order), and the statistics over the global batch.
public final class Routing<T: Scalar> {
    /// Kept assignment j sends token `tokens[j]` to global expert `experts[j]` with combine
    /// weight `weights[j]`.
    public internal(set) var tokens: [Int32] = []
    public internal(set) var experts: [Int32] = []
    public internal(set) var weights: [T] = []
    public internal(set) var statistics = RoutingStatistics()
    /// The forward ran in training mode (auxiliary losses that exist only in training read it).
    public internal(set) var training = false
    /// The context's loss weight (scales the auxiliary losses' gradients).
    public internal(set) var lossWeight = 1.0
    /// Tokens per sequence of this forward (sequence-wise losses).
    public internal(set) var sequenceLength = 1
    /// Selections per expert before capacity [E], and first choices [E]: this rank's counts,
    /// filled by a policy that drops (for the others the kept counts are the selections).
    var selectedPerExpert: [Int64] = []
    var firstChoicesPerExpert: [Int64] = []
    /// After the gate's all-reduce: the global selections and first choices per expert.
    public internal(set) var globalSelectedPerExpert: [Int64] = []
    public internal(set) var globalFirstChoicesPerExpert: [Int64] = []

    public init() {}

    public var count: Int { tokens.count }
    public var auxiliaryLoss: Double { statistics.auxiliaryLoss }
    public var keptPerExpert: [Int64] { statistics.keptPerExpert }
    public var selectedCount: Int64 { statistics.selectedCount }
    public var keptCount: Int64 { statistics.keptCount }

    func reset(expertCount: Int, context: RoutingContext) {
        tokens.removeAll(keepingCapacity: true)
        experts.removeAll(keepingCapacity: true)
        weights.removeAll(keepingCapacity: true)
        // In place: the per-expert arrays are reused from step to step.
        Routing.zero(&selectedPerExpert, count: expertCount)
        Routing.zero(&firstChoicesPerExpert, count: expertCount)
        Routing.zero(&globalSelectedPerExpert, count: expertCount)
        Routing.zero(&globalFirstChoicesPerExpert, count: expertCount)
        Routing.zero(&statistics.keptPerExpert, count: expertCount)
        Routing.zero(&statistics.selectedPerExpert, count: expertCount)
        statistics.auxiliaryLoss = 0
        statistics.selectedCount = 0
        statistics.keptCount = 0
        statistics.routerEntropy = nil
        statistics.globalTokens = context.globalTokens
        training = context.training
        lossWeight = context.lossWeight
        sequenceLength = context.sequenceLength
    }

    private static func zero(_ counts: inout [Int64], count: Int) {
        if counts.count != count { counts = Array(repeating: 0, count: count) }
        for e in 0..<count { counts[e] = 0 }
    }

    /// Dense phase: no assignments, no experts.
    func resetDense(globalTokens: Int) {
        tokens.removeAll(keepingCapacity: true)
        experts.removeAll(keepingCapacity: true)
        weights.removeAll(keepingCapacity: true)
        statistics = .dense(globalTokens: globalTokens)
    }

    @inline(__always) func append(token: Int, expert: Int, weight: T) {
        tokens.append(Int32(token))
        experts.append(Int32(expert))
        weights.append(weight)
    }
}

/// The router's output for one forward: logits [N, E], and the probabilities over experts
/// [N, E] when the policy computes them (softmax(l) row by row; activation_dts stores its G).
public final class RouterScores<T: Scalar> {
    public let logits = Tensor<T>()
    public let probabilities = Tensor<T>()
    /// log Σ_e exp(l_e) per row, with the softmax (the z-loss reads it).
    public internal(set) var logSumExp: [T] = []
    public internal(set) var hasProbabilities = false

    public init() {}

    /// p = softmax(l) for every row (once per forward: later calls reuse it).
    func softmax(rows: Int) {
        guard !hasProbabilities else { return }
        let experts = logits.columns
        probabilities.resize(rows: rows, columns: experts)
        if logSumExp.count != rows { logSumExp = Array(repeating: 0, count: rows) }
        if T.self == Float.self && experts < 16 {
            logSumExp.withUnsafeMutableBufferPointer { lse in
                FloatKernels.narrowSoftmaxRows(asFloat(UnsafePointer(logits.pointer)), into: asFloat(probabilities.pointer), rows: rows,
                                               count: experts, logSumExp: asFloat(lse.baseAddress!))
            }
            hasProbabilities = true
            return
        }
        for s in 0..<rows {
            let p = probabilities.row(s)
            p.update(from: logits.row(s), count: experts)
            logSumExp[s] = Kernels.softmaxRow(p, count: experts)
        }
        hasProbabilities = true
    }

    /// The policy filled `probabilities` itself.
    func markProbabilitiesFilled() { hasProbabilities = true }

    /// sigmoid(l) per expert [N, E] (`moe.score: sigmoid`), independent of the others.
    public let affinities = Tensor<T>()

    func sigmoid(rows: Int) {
        let experts = logits.columns
        affinities.resize(rows: rows, columns: experts)
        Kernels.sigmoid(logits.pointer, into: affinities.pointer, count: rows * experts)
    }
}

/// Sums over the global batch that the parts of a gate need, all-reduced together: one small
/// collective per layer and step, however many losses the gate composes.
final class GlobalSums {
    private(set) var values: [Double] = []

    func reset(count: Int) {
        if values.count != count { values = Array(repeating: 0, count: count) }
        for index in values.indices { values[index] = 0 }
    }

    subscript(index: Int) -> Double {
        get { values[index] }
        set { values[index] = newValue }
    }

    func withSlots<R>(from offset: Int, _ body: (UnsafeMutablePointer<Double>) throws -> R) rethrows -> R {
        try values.withUnsafeMutableBufferPointer { try body($0.baseAddress! + offset) }
    }

    func allReduce(_ communicator: Communicator) throws { try communicator.allReduce(&values) }
}
