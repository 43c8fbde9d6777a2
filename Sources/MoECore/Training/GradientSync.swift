import MoEComm
import MoEIO

/// How the replicated gradients become sums over ranks before the update, and how the updated
/// values reach every rank after it (docs/ARCHITECTURE.md, "One training step"). One strategy,
/// fixed at start:
/// - `allReduce`: the whole slab after backward;
/// - `overlapped` (`train.overlap_all_reduce`): one bucket per block, started as soon as the
///   block's backward finished (GradientBuckets);
/// - `sharded` (ZeRO stage 1, `train.shard_optimizer` on more than one rank): a reduce-scatter
///   gives each rank the sums of its slice, each rank updates its slice, an all-gather shares the
///   values (in bf16 mode the fp32 masters are sharded too: ShardedMasters).
/// Expert gradients are complete on their host (every token routed to an expert reached it
/// through the all-to-all); with replicated experts (R > E) each copy saw only its group's
/// tokens, so the copies also sum theirs within their replica group.
final class GradientSync {
    enum Strategy {
        case allReduce
        case overlapped(GradientBuckets)
        /// `counts`: every rank's slice length (what the collectives take, every step).
        case sharded(counts: [Int], masters: ShardedMasters?)
    }

    let strategy: Strategy
    let communicator: Communicator
    /// The ranks holding copies of this rank's experts (R > E only).
    let replicaCommunicator: Communicator?
    /// This rank's slice of the replicated store: the part its optimizer updates.
    let optimizerShard: Range<Int>
    /// Seconds blocked in this step's collectives, seconds spent starting overlapped buckets in
    /// backward (MPI reduces on the calling thread as it starts and progresses them), and the
    /// span the buckets were in flight (`takeTiming` resets all three).
    private var blockedSeconds = 0.0, startingSeconds = 0.0, overlappedSpan = 0.0
    /// [loss sum, expert gradient sum of squares (+ this rank's slice's, sharded)]: one all-reduce.
    private var scalars: [Double] = [0, 0]

    init(model: GPTModel<Float>, train: TrainConfig, communicator: Communicator) throws {
        self.communicator = communicator
        let store = model.replicated
        if train.shardOptimizer && communicator.size > 1 {
            let slices = AdamW<Float, Replicated>.slices(count: store.count, ranks: communicator.size)
            optimizerShard = slices[communicator.rank]
            // In bf16 mode the products read the bf16 copy, so the fp32 masters are sharded with the moments.
            let masters = model.precision == .bf16 ? ShardedMasters(entries: store.entries, slices: slices, rank: communicator.rank) : nil
            if let masters { try store.keepValues(only: masters.kept) }
            strategy = .sharded(counts: slices.map(\.count), masters: masters)
        } else {
            optimizerShard = 0..<store.count
            let buckets = train.overlapAllReduce && communicator.size > 1 ? GradientBuckets(entries: store.entries, layers: model.config.layers) : nil
            strategy = buckets.map { .overlapped($0) } ?? .allReduce
        }
        let placement = model.placement
        replicaCommunicator = placement.replicas > 1
            ? try communicator.split(color: communicator.rank % placement.groupSize, key: communicator.rank) : nil
    }

    var shardedMasters: ShardedMasters? {
        if case let .sharded(_, masters) = strategy { return masters }
        return nil
    }

    /// For the last micro-batch's backward: starts block `layer`'s bucket as its backward ends
    /// (nil unless overlapped).
    func blockDone(_ model: GPTModel<Float>) -> ((Int) throws -> Void)? {
        guard case let .overlapped(buckets) = strategy else { return nil }
        let gradients = model.replicated.gradients, communicator = self.communicator
        return { [unowned self] layer in
            try Clock.measure(&startingSeconds) { try buckets.start(buckets.blockRanges[layer], of: gradients, communicator: communicator) }
        }
    }

    /// Sums the step's gradients over ranks (sharded: this rank's slice only; the rest is left
    /// undefined) and returns the global loss sum and gradient norm (expert squares summed over
    /// ranks, each expert once).
    func sumGradients(_ model: GPTModel<Float>, localLossSum: Double) throws -> (lossSum: Double, gradientNorm: Double) {
        let replicated = model.replicated, experts = model.experts
        try measure {
            let gradients = UnsafeMutableBufferPointer(start: replicated.gradients, count: replicated.count)
            switch strategy {
            case let .sharded(counts, _): try communicator.reduceScatterSum(gradients, blockCounts: counts)
            case let .overlapped(buckets): overlappedSpan = try buckets.finish(replicated.gradients, communicator: communicator)
            case .allReduce: try communicator.allReduce(gradients)
            }
            if let replicaCommunicator {
                try replicaCommunicator.allReduce(UnsafeMutableBufferPointer(start: experts.gradients, count: experts.count))
                for layer in model.moeLayers { layer.gradientsChanged() }
            }
        }
        scalars[0] = localLossSum
        // The MoE layers' sums from after their products, where current; else a pass over memory.
        let expertSquares = model.expertGradientSquares() ?? Kernels.sumOfSquares(experts.gradients, count: experts.count)
        scalars[1] = expertSquares / Double(model.placement.replicas)
        let isSharded = optimizerShard.count != replicated.count
        if isSharded { scalars[1] += Kernels.sumOfSquares(replicated.gradients + optimizerShard.lowerBound, count: optimizerShard.count) }
        try measure { try communicator.allReduce(&scalars) }
        let replicatedSquares = isSharded ? 0 : Kernels.sumOfSquares(replicated.gradients, count: replicated.count)
        return (scalars[0], (replicatedSquares + scalars[1]).squareRoot())
    }

    /// After the update, sharded: every rank updated its slice; all-gather the replicated values
    /// (with sharded masters: the bf16 copy and the tensors read in fp32).
    func shareUpdatedValues(_ model: GPTModel<Float>) throws {
        guard case let .sharded(counts, masters) = strategy else { return }
        try measure {
            if let masters {
                try masters.gather(model.replicated, over: communicator)
            } else {
                try communicator.allGather(UnsafeMutableBufferPointer(start: model.replicated.values, count: model.replicated.count),
                                           blockCounts: counts)
            }
        }
    }

    /// Runs `body` with every replicated fp32 master value present on this rank (collective: with
    /// sharded masters they are all-gathered first and released again after). With `writing`,
    /// `body` may write them (the same on every rank) and the bf16 copy follows after.
    func withAllReplicatedValues<R>(_ model: GPTModel<Float>, writing: Bool, _ body: () throws -> R) throws -> R {
        if let shardedMasters {
            return try shardedMasters.withAllValues(model.replicated, over: communicator, writing: writing, body)
        }
        defer { if writing { model.replicated.didWriteAllValues() } }
        return try body()
    }

    /// Times a collective of this step (also the replica check, which the trainer runs here).
    func measure(_ body: () throws -> Void) rethrows { try Clock.measure(&blockedSeconds, body) }

    /// This step's blocked and starting seconds and overlapped span; resets them.
    func takeTiming() -> (blocked: Double, starting: Double, overlappedSpan: Double) {
        defer { blockedSeconds = 0; startingSeconds = 0; overlappedSpan = 0 }
        return (blockedSeconds, startingSeconds, overlappedSpan)
    }
}
