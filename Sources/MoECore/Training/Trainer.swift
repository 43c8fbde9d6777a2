#if canImport(Glibc)
import Glibc
#endif
import MoEComm
import MoEIO

/// Training failures every rank detects together (their inputs are global values).
public enum TrainingError: Error, CustomStringConvertible, AgreedFailure {
    case replicasDiverged(step: Int, rank: Int, checksum: String)
    case expertCopiesDiverged(step: Int, rank: Int, checksum: String)
    case nonFinite(skips: Int, firstStep: Int, location: String)
    public var description: String {
        switch self {
        case let .replicasDiverged(step, rank, checksum):
            return "replicated parameters differ between ranks after step \(step) (rank \(rank) has checksum \(checksum)); ranks are no longer training the same model"
        case let .expertCopiesDiverged(step, rank, checksum):
            return "the copies of an expert differ between ranks after step \(step) (rank \(rank) has checksum \(checksum)); the expert replicas are no longer training the same experts"
        case let .nonFinite(skips, firstStep, location):
            return "stopping: \(skips) updates in a row had a non-finite loss or gradient (first at step \(firstStep), in \(location)); the last complete checkpoint is unchanged; lower train.lr or check the data"
        }
    }
}

/// What one training step did, over the global batch (identical on every rank).
public struct StepReport: Sendable {
    public var step: Int
    /// Mean cross-entropy of the global batch (nats per token), before the update.
    public var loss: Double
    /// Σ over MoE layers of the weighted auxiliary losses.
    public var auxiliaryLoss: Double
    public var learningRate: Double
    /// Global gradient norm before clipping.
    public var gradientNorm: Double
    public var moeLayers: [RoutingStatistics]
    /// Where this rank's time went.
    public var profile: StepProfile
    /// The gate's temperature at this step (dts, activation_dts).
    public var temperature: Double?
    /// The training phase: dense (EvoMoE before the spawn), soft/hard (DTS selection),
    /// stage1/stage2 (StableMoE) or sparse.
    public var phase: TrainingPhase
    /// The update was skipped: the loss or the gradient was not finite.
    public var skipped = false
}

/// Owns the model, its optimizers and the data; `trainStep()` is the one place a training step is
/// sequenced (docs/ARCHITECTURE.md, "One training step"):
///   batch -> forward -> backward -> all-reduce replicated gradients -> clip -> AdamW.
/// Logging, evaluation and checkpoints happen in `TrainingRun`, around it.
public final class Trainer {
    public let config: RunConfig
    public let model: GPTModel<Float>
    public let communicator: Communicator
    public let replicatedOptimizer: AdamW<Float, Replicated>
    public let expertOptimizer: AdamW<Float, ExpertSharded>
    public let schedule: LearningRateSchedule
    public let trainData: TokenBatches
    public let validationData: TokenBatches?
    /// EvoMoE's dense phase and spawn (a recipe with spawn step 0 never trains dense).
    public let recipe: EvoMoERecipe
    /// The next step to run (0-based); equals the number of updates applied.
    public internal(set) var step = 0
    /// Armed test faults (see FaultInjection).
    public internal(set) var faults: [FaultInjection] = []

    /// The ranks holding copies of this rank's experts (R > E only): their gradients are
    /// all-reduced within this group.
    let replicaCommunicator: Communicator?
    var inputs: [Int32] = [], targets: [Int32] = []
    /// The length of the slice of the replicated values each rank updates, by rank: one slice
    /// (all values) unless `train.shard_optimizer`. Computed once: the collectives take it every step.
    let replicatedShardCounts: [Int]
    /// Non-nil when the replicated gradients' all-reduce overlaps backward (train.overlap_all_reduce).
    let gradientBuckets: GradientBuckets?
    /// Non-nil when the replicated fp32 master values are sharded too (bf16 with a sharded optimizer).
    let shardedMasters: ShardedMasters?
    /// [loss sum, expert gradient sum of squares]: all-reduced together.
    var scalars: [Double] = [0, 0]
    let routingKey: RandomKey

    public convenience init(config: RunConfig, communicator: Communicator, trainFile: TokenFile, validationFile: TokenFile?) throws {
        try self.init(config: config, communicator: communicator, trainFiles: [trainFile], validationFiles: validationFile.map { [$0] } ?? [])
    }

    /// trainFiles: the training shards (at least one); validationFiles: none for no validation.
    public init(config: RunConfig, communicator: Communicator, trainFiles: [TokenFile], validationFiles: [TokenFile]) throws {
        let dataVocabulary = trainFiles.map(\.vocabularySize).max() ?? 256
        let vocabularySize = config.model.vocabularySize > 0 ? config.model.vocabularySize : dataVocabulary
        for file in trainFiles + validationFiles where file.vocabularySize > vocabularySize {
            throw TokenBatches.DataError.vocabularyMismatch(path: file.path, file: file.vocabularySize, model: vocabularySize)
        }
        var resolved = config
        resolved.model.vocabularySize = vocabularySize
        self.config = resolved
        self.communicator = communicator
        // Hash routing's balanced table: counts per id, in one streaming pass over the shards.
        var frequencies = [Int](repeating: 0, count: vocabularySize)
        for file in trainFiles { file.forEachChunk { for token in $0 { frequencies[Int(token)] += 1 } } }
        model = try GPTModel<Float>(resolved, vocabularySize: vocabularySize, communicator: communicator,
                                    tokenFrequencies: frequencies)
        model.initializeParameters(seed: config.train.seed)
        let settings = AdamWSettings(beta1: config.train.beta1, beta2: config.train.beta2,
                                     epsilon: config.train.epsilon, weightDecay: config.train.weightDecay)
        // ZeRO stage 1: this rank keeps the AdamW moments of its slice of the replicated values only.
        let replicatedShards = AdamW<Float, Replicated>.slices(count: model.replicated.count,
                                                               ranks: config.train.shardOptimizer ? communicator.size : 1)
        replicatedShardCounts = replicatedShards.map(\.count)
        replicatedOptimizer = AdamW(store: model.replicated, settings: settings,
                                    shard: replicatedShards[config.train.shardOptimizer ? communicator.rank : 0])
        expertOptimizer = AdamW(store: model.experts, settings: settings)
        // In bf16 mode the products read the bf16 copy, so the fp32 masters are sharded with the moments.
        if replicatedOptimizer.isSharded && model.precision == .bf16 {
            let masters = ShardedMasters(entries: model.replicated.entries, slices: replicatedShards, rank: communicator.rank)
            try model.replicated.keepValues(only: masters.kept)
            shardedMasters = masters
        } else {
            shardedMasters = nil
        }
        gradientBuckets = config.train.overlapAllReduce && !config.train.shardOptimizer && communicator.size > 1
            ? GradientBuckets(entries: model.replicated.entries, layers: config.model.layers) : nil
        schedule = LearningRateSchedule(peak: config.train.learningRate, minimum: config.train.minLearningRate,
                                        warmupSteps: config.train.warmupSteps, totalSteps: config.train.steps)
        trainData = try TokenBatches(files: trainFiles, length: config.model.context, seed: config.train.seed)
        validationData = validationFiles.isEmpty ? nil
            : try TokenBatches(files: validationFiles, length: config.model.context, seed: config.train.seed)
        routingKey = RandomKey(UInt64(config.train.seed)).derive("routing")
        recipe = EvoMoERecipe(resolved)
        let placement = model.placement
        replicaCommunicator = placement.replicas > 1
            ? try communicator.split(color: communicator.rank % placement.groupSize, key: communicator.rank) : nil
    }

    public var batchSize: Int { config.train.batchSize }
    public var context: Int { config.model.context }
    /// A: micro-batches per optimizer step.
    public var accumulation: Int { config.train.gradAccum }
    /// Tokens in one micro-batch over all ranks: the group each forward routes together
    /// (capacities, balance statistics; docs/ARCHITECTURE.md, "Gradient accumulation").
    public var microBatchTokens: Int { communicator.size * batchSize * context }
    /// Tokens in one step's global batch (all ranks, all micro-batches).
    public var globalBatchTokens: Int { microBatchTokens * accumulation }

    /// One optimizer update on the global batch of step `step`: A forward/backward passes over
    /// micro-batches whose gradients add up, then one all-reduce and one update.
    public func trainStep() throws -> StepReport {
        _ = model.takeProfile()   // drop time an evaluation may have left behind
        let started = Clock.nanoseconds()
        var allReduceSeconds = 0.0, optimizerSeconds = 0.0, overlappedSpan = 0.0
        model.zeroGradients()
        let phase = self.phase
        prepareGates()
        let (localLossSum, auxiliaryLoss, moeLayers) = try accumulateGradients()
        if FaultInjection.due(.nanGradient, faults: faults, step: step) { model.replicated.gradients[0] = .nan }
        heartbeat.beat("gradient all-reduce", step: step)
        // 4. replicated gradients: each rank holds its tokens' share of d(global mean loss), so
        //    the sum over ranks is the full gradient. Expert gradients are already complete on
        //    their host (every token routed to an expert reached it through the all-to-all).
        var waitSeconds = 0.0
        if separateWaiting { try Clock.measure(&waitSeconds) { try communicator.barrier() } }
        let replicatedGradients = UnsafeMutableBufferPointer(start: model.replicated.gradients, count: model.replicated.count)
        try Clock.measure(&allReduceSeconds) {
            //    Sharded: each rank needs the sum only over its slice (the rest is left undefined).
            if replicatedOptimizer.isSharded {
                try communicator.reduceScatterSum(replicatedGradients, blockCounts: replicatedShardCounts)
            } else if let gradientBuckets {
                //  Overlapped: the blocks' buckets are in flight since their backward; the rest starts now.
                overlappedSpan = try gradientBuckets.finish(model.replicated.gradients, communicator: communicator)
            } else {
                try communicator.allReduce(replicatedGradients)
            }
            //    With replicated experts (R > E) each copy saw only its group's tokens: sum the copies.
            try replicaCommunicator?.allReduce(UnsafeMutableBufferPointer(start: model.experts.gradients, count: model.experts.count))
        }
        // 5. global norm and clipping; expert squares are summed over ranks (each expert once).
        scalars[0] = localLossSum
        scalars[1] = Kernels.sumOfSquares(model.experts.gradients, count: model.experts.count)
            / Double(model.placement.replicas)
        let shard = replicatedOptimizer.shard
        if replicatedOptimizer.isSharded { scalars[1] += Kernels.sumOfSquares(model.replicated.gradients + shard.lowerBound, count: shard.count) }
        try Clock.measure(&allReduceSeconds) { try communicator.allReduce(&scalars) }
        let replicatedSquares = replicatedOptimizer.isSharded ? 0 : Kernels.sumOfSquares(model.replicated.gradients, count: model.replicated.count)
        let gradientNorm = (replicatedSquares + scalars[1]).squareRoot()
        let clip = config.train.gradClip
        let gradientScale = clip > 0 && gradientNorm > clip ? clip / gradientNorm : 1
        let learningRate = schedule.learningRate(at: step)
        // Loss and norm are global values, so every rank takes the same branch.
        let lossSum = scalars[0]
        let skipped = !lossSum.isFinite || !gradientNorm.isFinite
        if skipped {
            skippedUpdates += 1
            consecutiveSkips += 1
            if consecutiveSkips == 1 { firstNonFinite = (step, locateNonFinite(loss: lossSum)) }
            if consecutiveSkips > config.train.maxConsecutiveSkips {
                throw TrainingError.nonFinite(skips: consecutiveSkips, firstStep: firstNonFinite?.step ?? step,
                                              location: firstNonFinite?.location ?? "?")
            }
        } else {
            consecutiveSkips = 0
            heartbeat.beat("optimizer", step: step)
            Clock.measure(&optimizerSeconds) {
                replicatedOptimizer.update(learningRate: learningRate, gradientScale: gradientScale)
                expertOptimizer.update(learningRate: learningRate, gradientScale: gradientScale)
            }
            //  Sharded: every rank updated its slice; all-gather the replicated values (with
            //  sharded masters: the bf16 copy and the tensors read in fp32).
            if replicatedOptimizer.isSharded {
                try Clock.measure(&allReduceSeconds) {
                    if let shardedMasters {
                        try shardedMasters.gather(model.replicated, over: communicator)
                    } else {
                        try communicator.allGather(UnsafeMutableBufferPointer(start: model.replicated.values, count: model.replicated.count),
                                                   blockCounts: replicatedShardCounts)
                    }
                }
            }
        }
        if config.train.consistencyCheckEvery > 0 && (step + 1) % config.train.consistencyCheckEvery == 0 {
            try Clock.measure(&allReduceSeconds) { try checkReplicasAgree() }
        }
        var profile = model.takeProfile()
        profile.allReduce = allReduceSeconds
        // Overlapped buckets are in flight for `overlappedSpan`, blocked on for part of it only.
        profile.totalCommunication += allReduceSeconds + max(0, overlappedSpan - allReduceSeconds)
        profile.exposedCommunication += allReduceSeconds
        profile.waiting += waitSeconds
        profile.optimizer = optimizerSeconds
        profile.total = Double(Clock.nanoseconds() - started) * 1e-9
        let report = StepReport(step: step, loss: scalars[0] / Double(globalBatchTokens), auxiliaryLoss: auxiliaryLoss,
                                learningRate: learningRate, gradientNorm: gradientNorm, moeLayers: moeLayers,
                                profile: profile, temperature: model.moeLayers.first?.gate.temperature(step: appliedUpdates),
                                phase: phase, skipped: skipped)
        adaptGates(moeLayers)
        // A skipped update still spent its forward and backward.
        trainingFlops += model.trainingFlops(tokens: globalBatchTokens, expertAssignments: moeLayers.reduce(0) { $0 + $1.keptCount })
        trainingSeconds += profile.total
        step += 1
        if step == recipe.spawnStep { try spawnExperts() }
        return report
    }

    /// Forward and backward over this rank's A micro-batches of the step. Micro-batch a of rank r
    /// is sequence block a·R + r of the step's global batch: R ranks with A micro-batches read the
    /// data R·A ranks with one would, and micro-batch a over all ranks is the same block of
    /// sequences for any R. Each forward routes its micro-batch over all ranks as one group (a
    /// token's capacity slot and the balance statistics cannot depend on micro-batches not yet
    /// computed); the cross-entropy is normalised by the whole step's tokens and the auxiliary
    /// losses are averaged over the micro-batches. Returns this rank's loss sum, the step's
    /// auxiliary loss and each MoE layer's statistics over the whole step.
    func accumulateGradients() throws -> (lossSum: Double, auxiliary: Double, layers: [RoutingStatistics]) {
        let rank = communicator.rank, localTokens = batchSize * context, stepKey = routingKey.derive(step)
        var lossSum = 0.0, auxiliary = 0.0, parts: [[RoutingStatistics]] = []
        for micro in 0..<accumulation {
            trainData.trainingBatch(step: step, rank: micro * communicator.size + rank, batchSize: batchSize,
                                    inputs: &inputs, targets: &targets)
            heartbeat.beat("forward", step: step)
            let forward = try model.forward(tokens: inputs, targets: targets, batch: batchSize, length: context, training: true,
                                            globalTokens: microBatchTokens, firstGlobalToken: rank * localTokens,
                                            noiseKey: accumulation == 1 ? stepKey : stepKey.derive(micro),
                                            step: appliedUpdates, lossWeight: 1 / Double(accumulation))
            heartbeat.beat("backward", step: step)
            FaultInjection.trigger(.kill, faults: faults, step: step)
            FaultInjection.trigger(.sleep, faults: faults, step: step)
            // The last micro-batch completes each block's gradients: start its all-reduce.
            let gradients = model.replicated.gradients, buckets = micro == accumulation - 1 ? gradientBuckets : nil
            try model.backward(globalTokens: globalBatchTokens, blockDone: buckets.map { buckets in
                { layer in try buckets.start(buckets.blockRanges[layer], of: gradients, communicator: self.communicator) }
            })
            lossSum += forward.localLossSum
            auxiliary += forward.auxiliaryLoss / Double(accumulation)
            guard accumulation > 1 else { return (lossSum, auxiliary, forward.moeLayers) }
            parts.append(forward.moeLayers)
        }
        let layers = parts[0].indices.map { layer in RoutingStatistics.combined(parts.map { $0[layer] }) }
        return (lossSum, auxiliary, layers)
    }

    /// Model FLOPs spent on training steps so far, over all ranks (`GPTModel.trainingFlops`, with
    /// the experts each step's gates actually kept), and the seconds those steps took; both are
    /// checkpointed, so a resumed run continues them. Equal-compute comparisons read the first.
    public internal(set) var trainingFlops = 0.0
    public internal(set) var trainingSeconds = 0.0

    /// Updates skipped because the loss or gradient was not finite (all, and in a row).
    public internal(set) var skippedUpdates = 0
    /// Updates applied so far: the clock of every gate schedule (DTS temperature, StableMoE's
    /// stages and freezing), which a skipped non-finite update does not advance. `step` counts
    /// attempted steps (data, learning rate, the spawn).
    public var appliedUpdates: Int { step - skippedUpdates }
    public internal(set) var consecutiveSkips = 0
    var firstNonFinite: (step: Int, location: String)?
    /// Benchmarks: time the wait for the slowest rank apart from the transfers (a barrier before
    /// each exchange and the gradient all-reduce; see StepProfile.waiting).
    public var separateWaiting = false {
        didSet { for layer in model.moeLayers { layer.separateWaiting = separateWaiting } }
    }
    /// Names the operation in progress, for the stall watchdog.
    public let heartbeat = Heartbeat()

    /// Where the first non-finite value is: the first block whose output is not finite, else
    /// the first parameter whose gradient is not.
    func locateNonFinite(loss: Double) -> String {
        if let block = model.firstNonFiniteActivation() { return block }
        if !loss.isFinite { return "the loss" }
        for entry in model.replicated.entries where !Kernels.isFinite(model.replicated.gradients + entry.offset, count: entry.count) {
            return "the gradient of \(entry.name)"
        }
        for entry in model.experts.entries where !Kernels.isFinite(model.experts.gradients + entry.offset, count: entry.count) {
            return "the gradient of \(entry.name) (rank \(communicator.rank))"
        }
        return "an expert on another rank"
    }

    /// The phase the next step trains in.
    public var phase: TrainingPhase {
        guard let layer = model.moeLayers.first, !layer.isDense else { return .dense }
        return layer.gate.phase(step: appliedUpdates)
    }

    /// Parameters a gate freezes in its current phase (StableMoE's stage 2: no updates, no decay).
    func prepareGates() {
        for layer in model.moeLayers {
            for (parameter, frozen) in layer.gate.frozenParameters(step: appliedUpdates) {
                replicatedOptimizer.freeze(model.replicated.name(of: parameter), frozen)
            }
        }
    }

    /// Gate controllers (ReLU routing's λ) after each update, from every MoE layer's global
    /// statistics (identical on every rank).
    func adaptGates(_ statistics: [RoutingStatistics]) {
        for layer in model.moeLayers { layer.gate.adapt(to: statistics) }
    }

    /// EvoMoE: spawn the experts from the dense FFNs; new tensors restart their AdamW state, the
    /// dense FFNs are frozen from here on.
    func spawnExperts() throws {
        let (fresh, retired) = try withAllReplicatedValues(writing: true) { recipe.spawn(model, seed: config.train.seed) }
        model.experts.didWriteAllValues()
        replicatedOptimizer.reset(entries: fresh)
        expertOptimizer.reset(entries: Set(model.experts.entries.map(\.name)))
        for name in retired { replicatedOptimizer.freeze(name) }
    }

    /// Runs `body` with every replicated fp32 master value present on this rank (collective: with
    /// sharded masters they are all-gathered first and released again after). With `writing`,
    /// `body` may write them (the same on every rank) and the bf16 copy follows after.
    public func withAllReplicatedValues<R>(writing: Bool = false, _ body: () throws -> R) throws -> R {
        if let shardedMasters {
            return try shardedMasters.withAllValues(model.replicated, over: communicator, writing: writing, body)
        }
        defer { if writing { model.replicated.didWriteAllValues() } }
        return try body()
    }

    /// After loading a checkpoint saved at `step`: the EvoMoE phase and frozen tensors.
    public func restorePhase() {
        recipe.restore(model, step: step)
        if !recipe.isDense(step: step) {
            for name in recipe.retiredEntries(model) { replicatedOptimizer.freeze(name) }
        }
        prepareGates()
    }

    /// Replicated parameters must be bit-identical on every rank (they receive identical
    /// all-reduced gradients), and so must the copies of each expert when R > E (they receive
    /// gradients all-reduced within their replica group). A checksum of their bits, compared by
    /// min/max all-reduce, catches a rank that diverged (a bug, a bit flip, a mismatched binary)
    /// before it poisons a run.
    public func checkReplicasAgree() throws {
        let replicated = replicatedChecksum()
        if try !Trainer.agree(on: replicated, over: communicator) {
            throw TrainingError.replicasDiverged(step: step + 1, rank: communicator.rank, checksum: String(replicated, radix: 16))
        }
        if let replicaCommunicator {
            let experts = Trainer.fnv1a(UnsafeRawBufferPointer(start: model.experts.values, count: model.experts.count * 4))
            if try !Trainer.agree(on: experts, over: replicaCommunicator) {
                throw TrainingError.expertCopiesDiverged(step: step + 1, rank: communicator.rank, checksum: String(experts, radix: 16))
            }
        }
    }

    /// A checksum of what every rank holds of the replicated parameters: their fp32 values, or
    /// with sharded masters (each rank keeps its own slice) the bf16 copy every rank holds whole
    /// and the tensors read in fp32.
    func replicatedChecksum() -> UInt64 {
        let store = model.replicated
        guard let shardedMasters, let copy = store.bfloat16Values else {
            return Trainer.fnv1a(UnsafeRawBufferPointer(start: store.values, count: store.count * 4))
        }
        var checksum = Trainer.fnv1a(UnsafeRawBufferPointer(start: copy, count: store.count * 2))
        for range in shardedMasters.readRanges {
            checksum = Trainer.fnv1a(UnsafeRawBufferPointer(start: store.values + range.lowerBound, count: range.count * 4), continuing: checksum)
        }
        return checksum
    }

    /// FNV-1a over 16-bit words (`bytes.count` is even).
    static func fnv1a(_ bytes: UnsafeRawBufferPointer, continuing checksum: UInt64 = 0xcbf2_9ce4_8422_2325) -> UInt64 {
        var checksum = checksum
        for index in 0..<bytes.count / 2 {
            checksum = (checksum ^ UInt64(bytes.load(fromByteOffset: 2 * index, as: UInt16.self))) &* 0x100_0000_01b3
        }
        return checksum
    }

    /// Collective over `communicator`: true on every rank when all ranks have the same checksum.
    static func agree(on checksum: UInt64, over communicator: Communicator) throws -> Bool {
        let value = Int64(bitPattern: checksum)
        var extremes = [value, ~value]   // max of ~x is ~min of x
        try communicator.allReduce(&extremes, op: .max)
        return extremes[0] == ~extremes[1]
    }

    /// Mean cross-entropy over the validation file's fixed evaluation windows
    /// (`train.eval_batches` global batches), with the evaluation capacity factor.
    public func evaluate(batches: Int? = nil) throws -> Double? {
        guard let validationData else { return nil }
        return try Trainer.evaluate(model: model, data: validationData, batches: batches ?? config.train.evalBatches,
                                    batchSize: batchSize, communicator: communicator, step: step)
    }

    public static func evaluate(model: GPTModel<Float>, data: TokenBatches, batches: Int, batchSize: Int,
                                communicator: Communicator, step: Int = 0) throws -> Double {
        var inputs: [Int32] = [], targets: [Int32] = []
        let length = data.length, localTokens = batchSize * length, globalTokens = communicator.size * localTokens
        var lossSum = 0.0
        for index in 0..<batches {
            data.evaluationBatch(index: index, batches: batches, rank: communicator.rank, ranks: communicator.size,
                                 batchSize: batchSize, inputs: &inputs, targets: &targets)
            let result = try model.forward(tokens: inputs, targets: targets, batch: batchSize, length: length, training: false,
                                           globalTokens: globalTokens, firstGlobalToken: communicator.rank * localTokens,
                                           noiseKey: RandomKey(0).derive("evaluation").derive(index), step: step)
            lossSum += result.localLossSum
        }
        return try communicator.allReduce(lossSum) / Double(batches * globalTokens)
    }

    /// Bytes of text behind the targets `evaluate` scores with the same arguments, summed over
    /// ranks: the loss times the tokens over this is nats per byte, comparable across tokenizers.
    public static func evaluatedBytes(data: TokenBatches, batches: Int, batchSize: Int, communicator: Communicator,
                                      tokenizer: Tokenizer) throws -> Int {
        let lengths = (0..<tokenizer.vocabularySize).map { tokenizer.decode(Int32($0)).count }
        var inputs: [Int32] = [], targets: [Int32] = []
        var bytes = 0
        for index in 0..<batches {
            data.evaluationBatch(index: index, batches: batches, rank: communicator.rank, ranks: communicator.size,
                                 batchSize: batchSize, inputs: &inputs, targets: &targets)
            for target in targets { bytes += lengths.indices.contains(Int(target)) ? lengths[Int(target)] : 0 }
        }
        return Int(try communicator.allReduce(Int64(bytes)))
    }
}
