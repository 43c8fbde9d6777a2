import MoEComm
import MoEIO

/// Owns the model, its optimizers and the data; `trainStep()` is the one place a training step is
/// sequenced (docs/ARCHITECTURE.md, "One training step"):
///   batch -> forward -> backward -> sum gradients over ranks -> clip -> AdamW.
/// The pieces it sequences are types of their own: GradientSync (the three ways gradients are
/// summed), NonFiniteGuard (the skip policy), ReplicaCheck, Evaluation. Logging, evaluation
/// intervals and checkpoints happen in `TrainingRun`, around it.
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
    /// The step counters; `restore(_:)` sets them after a checkpoint load.
    public private(set) var state = TrainingState()
    /// A test's or a benchmark's hooks (nil in production runs).
    public var hooks: TrainingHooks? {
        didSet { for layer in model.moeLayers { layer.hooks = hooks } }
    }
    /// Names the operation in progress, for the stall watchdog.
    public let heartbeat = Heartbeat()

    let sync: GradientSync
    let replicaCheck: ReplicaCheck
    var nonFinite: NonFiniteGuard
    let routingKey: RandomKey
    var inputs: [Int32] = [], targets: [Int32] = []
    /// The last update zeroed every gradient as it read it: the next step skips its zeroing pass.
    var gradientsCleared = false

    /// trainFiles: the training shards (at least one); validationFiles: none for no validation.
    public init(config: RunConfig, communicator: Communicator, trainFiles: [TokenFile], validationFiles: [TokenFile]) throws {
        let data = try TrainingData(config: config, trainFiles: trainFiles, validationFiles: validationFiles, ranks: communicator.size)
        var resolved = config
        resolved.model.vocabularySize = data.vocabularySize
        self.config = resolved
        self.communicator = communicator
        (trainData, validationData) = (data.train, data.validation)
        model = try GPTModel<Float>(resolved, vocabularySize: data.vocabularySize, communicator: communicator,
                                    tokenFrequencies: data.frequencies)
        model.initializeParameters(seed: config.train.seed)
        let train = config.train
        let settings = AdamWSettings(beta1: train.beta1, beta2: train.beta2, epsilon: train.epsilon, weightDecay: train.weightDecay)
        sync = try GradientSync(model: model, train: train, communicator: communicator)
        // ZeRO stage 1: this rank keeps the AdamW moments of its slice of the replicated values only.
        replicatedOptimizer = AdamW(store: model.replicated, settings: settings, shard: sync.optimizerShard)
        expertOptimizer = AdamW(store: model.experts, settings: settings)
        expertOptimizer.gradientsOverwritten = Set(model.moeLayers.flatMap(\.weightGradientEntries))
        schedule = LearningRateSchedule(train)
        routingKey = RandomKey(UInt64(train.seed)).derive("routing")
        recipe = EvoMoERecipe(resolved)
        nonFinite = NonFiniteGuard(limit: train.maxConsecutiveSkips)
        replicaCheck = ReplicaCheck(communicator: communicator, replicaCommunicator: sync.replicaCommunicator, shardedMasters: sync.shardedMasters)
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
    /// Non-finite updates skipped in a row (the guard's count).
    public var consecutiveSkips: Int { nonFinite.consecutive }
    /// The phase the next step trains in.
    public var phase: TrainingPhase { model.phase(afterUpdates: state.applied) }

    /// One optimizer update on the global batch of step `state.attempted`: A forward/backward
    /// passes over micro-batches whose gradients add up, one sum over ranks, one update.
    public func trainStep() throws -> StepReport {
        _ = model.takeProfile()   // drop time an evaluation may have left behind
        let started = Clock.nanoseconds(), step = state.attempted, phase = self.phase
        if !gradientsCleared { model.zeroGradients() }
        gradientsCleared = false
        prepareGates()
        let pass = try accumulateGradients()
        for layer in model.moeLayers { layer.settleWeightGradients() }
        try hooks?.reached(.gradientsReady(model.replicated.gradients), step: step)
        heartbeat.beat("gradient all-reduce", step: step)
        let waiting = try hooks?.waitForSlowestRank(communicator) ?? 0
        let (lossSum, gradientNorm) = try sync.sumGradients(model, localLossSum: pass.lossSum)
        let learningRate = schedule.learningRate(at: step)
        let applies = try nonFinite.admits(lossSum: lossSum, gradientNorm: gradientNorm, step: step) {
            NonFiniteGuard.locate(in: model, loss: lossSum, rank: communicator.rank)
        }
        var optimizerSeconds = 0.0
        if applies {
            heartbeat.beat("optimizer", step: step)
            let clip = config.train.gradClip, scale = clip > 0 && gradientNorm > clip ? clip / gradientNorm : 1
            // The optimizer zeroes the gradients as it reads them where it reads them all (the
            // next step then skips its zeroing pass; the experts' weights it leaves to be
            // overwritten by the next backward); else the next step zeroes them.
            let clearing = replicatedOptimizer.visitsEveryGradient && expertOptimizer.visitsEveryGradient
            Clock.measure(&optimizerSeconds) {
                replicatedOptimizer.update(learningRate: learningRate, gradientScale: scale, clearingGradients: clearing)
                expertOptimizer.update(learningRate: learningRate, gradientScale: scale, clearingGradients: clearing)
            }
            gradientsCleared = clearing
            if clearing { for layer in model.moeLayers { layer.expectOverwrittenWeightGradients() } }
            try sync.shareUpdatedValues(model)
        }
        if config.train.consistencyCheckEvery > 0 && (step + 1) % config.train.consistencyCheckEvery == 0 {
            try sync.measure { try replicaCheck.verify(model, afterStep: step + 1) }
        }
        let profile = stepProfile(started: started, waiting: waiting, optimizer: optimizerSeconds)
        let report = StepReport(step: step, loss: lossSum / Double(globalBatchTokens), auxiliaryLoss: pass.auxiliary,
                                learningRate: learningRate, gradientNorm: gradientNorm, moeLayers: pass.layers, profile: profile,
                                temperature: model.temperature(afterUpdates: state.applied), phase: phase, skipped: !applies)
        try finishStep(report)
        return report
    }

    /// The step's profile: the model's stages, then the sums over ranks and the optimizer.
    func stepProfile(started: UInt64, waiting: Double, optimizer: Double) -> StepProfile {
        let (blocked, starting, overlappedSpan) = sync.takeTiming()
        var profile = model.takeProfile()
        profile.allReduce = blocked + starting
        // Overlapped buckets are in flight for `overlappedSpan`, blocked on for part of it only.
        profile.totalCommunication += blocked + max(0, overlappedSpan - blocked)
        profile.exposedCommunication += blocked
        profile.waitingForGradients += waiting
        profile.optimizer = optimizer
        profile.total = Double(Clock.nanoseconds() - started) * 1e-9
        return profile
    }

    /// After a step: gate controllers, the counters, and EvoMoE's spawn when it is due.
    func finishStep(_ report: StepReport) throws {
        for (index, layer) in model.moeLayers.enumerated() { layer.gate.adapt(to: report.moeLayers, own: index, applied: !report.skipped) }
        let kept = report.moeLayers.reduce(0) { $0 + $1.keptCount }
        state.trainingFlops += model.trainingFlops(tokens: globalBatchTokens, expertAssignments: kept)
        state.trainingSeconds += report.profile.total
        state.attempted += 1
        if report.skipped { state.skipped += 1 }
        if state.attempted == recipe.spawnStep {
            try recipe.spawnExperts(model, seed: config.train.seed, optimizers: (replicatedOptimizer, expertOptimizer), sync: sync)
        }
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
        let rank = communicator.rank, localTokens = batchSize * context, step = state.attempted, stepKey = routingKey.derive(step)
        var lossSum = 0.0, auxiliary = 0.0, parts: [[RoutingStatistics]] = []
        for micro in 0..<accumulation {
            trainData.trainingBatch(step: step, rank: micro * communicator.size + rank, batchSize: batchSize,
                                    inputs: &inputs, targets: &targets)
            heartbeat.beat("forward", step: step)
            let forward = try model.forward(tokens: inputs, targets: targets, batch: batchSize, length: context, training: true,
                                            globalTokens: microBatchTokens, firstGlobalToken: rank * localTokens,
                                            noiseKey: accumulation == 1 ? stepKey : stepKey.derive(micro),
                                            step: state.applied, lossWeight: 1 / Double(accumulation))
            heartbeat.beat("backward", step: step)
            try hooks?.reached(.betweenForwardAndBackward, step: step)
            // The last micro-batch completes each block's gradients: start its all-reduce.
            try model.backward(globalTokens: globalBatchTokens, blockDone: micro == accumulation - 1 ? sync.blockDone(model) : nil)
            lossSum += forward.localLossSum
            auxiliary += forward.auxiliaryLoss / Double(accumulation)
            guard accumulation > 1 else { return (lossSum, auxiliary, forward.moeLayers) }
            parts.append(forward.moeLayers)
        }
        let layers = parts[0].indices.map { layer in RoutingStatistics.combined(parts.map { $0[layer] }) }
        return (lossSum, auxiliary, layers)
    }

    /// Parameters a gate freezes in its current phase (StableMoE's stage 2: no updates, no decay).
    func prepareGates() {
        for layer in model.moeLayers {
            for (parameter, frozen) in layer.gate.frozenParameters(step: state.applied) {
                replicatedOptimizer.freeze(parameter, frozen)
            }
        }
    }

    /// Runs `body` with every replicated fp32 master value present on this rank (collective; see
    /// GradientSync.withAllReplicatedValues).
    public func withAllReplicatedValues<R>(writing: Bool = false, _ body: () throws -> R) throws -> R {
        try sync.withAllReplicatedValues(model, writing: writing, body)
    }

    /// After loading a checkpoint: its counters, the EvoMoE phase and the frozen tensors.
    public func restore(_ saved: TrainingState) {
        state = saved
        recipe.restore(model, step: state.attempted, optimizer: replicatedOptimizer)
        prepareGates()
    }

    /// Mean cross-entropy over the validation file's fixed evaluation windows
    /// (`train.eval_batches` global batches), with the evaluation capacity factor.
    public func evaluate(batches: Int? = nil) throws -> Double? {
        guard let validationData else { return nil }
        return try Evaluation.loss(model: model, data: validationData, batches: batches ?? config.train.evalBatches,
                                   batchSize: batchSize, communicator: communicator, step: state.attempted)
    }
}
