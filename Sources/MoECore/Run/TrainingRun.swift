import Foundation
import MoEComm
import MoEIO

/// The training loop around `Trainer.trainStep`: resume, evaluation, metrics, progress line and
/// checkpoints. Every rank runs it; only rank 0 writes files other than its expert shard.
public final class TrainingRun {
    public let runDirectory: String
    public let trainer: Trainer
    let communicator: Communicator
    let log: (String) -> Void
    let metrics: MetricsLog?
    /// Copied into every checkpoint, so a checkpoint decodes its own tokens.
    public let tokenizer: TokenizerFile?
    var health = ExpertHealth()

    public enum RunError: Error, CustomStringConvertible {
        case architectureConflict(checkpoint: String, keys: [String])
        case cannotCreate(path: String, reason: String)
        case configMismatch(rank: Int)
        public var description: String {
            switch self {
            case let .architectureConflict(checkpoint, keys):
                return "cannot resume from '\(checkpoint)': the config changes \(keys.joined(separator: ", ")), which must match the checkpoint (drop those --set overrides or start a new run directory)"
            case let .cannotCreate(path, reason): return "run directory '\(path)': \(reason)"
            case let .configMismatch(rank):
                return "rank \(rank) resolved another config than rank 0 (another --config, --set or file contents): every rank must train the same config"
            }
        }
    }

    /// Keys that fix the shape of the model and its routing (and how the routing evolves): they come from the checkpoint on
    /// resume, and a config that changes them is an error.
    public static let architectureSections: Set<String> = ["model", "moe", "evomoe", "dts", "gates"]
    /// Sections taken from the checkpoint on resume (the model and its routing, the EvoMoE and
    /// gate settings that shaped it).
    static let checkpointedSections: [(inout RunConfig, RunConfig) -> Void] = [
        { $0.model = $1.model }, { $0.moe = $1.moe }, { $0.evomoe = $1.evomoe }, { $0.dts = $1.dts }, { $0.gates = $1.gates },
    ]

    /// Builds the run: resolves the config against a checkpoint when resuming, reads the data,
    /// builds the trainer and loads its state. `log` receives rank 0's human-readable lines.
    public init(config requested: RunConfig, runDirectory: String, resume: Bool, communicator: Communicator,
                hooks: TrainingHooks? = nil, log: @escaping (String) -> Void) throws {
        self.runDirectory = runDirectory
        self.communicator = communicator
        self.log = log
        // Newest complete checkpoint first; the architecture comes from it.
        let candidates = resume ? Array(Checkpoint.complete(in: runDirectory).reversed()) : []
        if resume && candidates.isEmpty {
            log("--resume: no complete checkpoint in \(runDirectory)/checkpoints; starting from step 0")
        }
        let (config, trusted) = try TrainingRun.resolve(requested, candidates: candidates, communicator: communicator, log: log)
        try TrainingRun.checkRanksAgree(on: config, communicator: communicator)
        // Every rank reads the data itself; a file one node cannot read stops every rank with
        // that node's message (before any other collective).
        let dataConfig = config.data
        let (trainFiles, validationFiles, tokenizer) = try communicator.agree {
            try hooks?.reached(.readingData(path: dataConfig.train.first ?? ""), step: 0)
            let trainFiles = try TokenFile.read(patterns: dataConfig.train, key: "data.train")
            return (trainFiles, try TokenFile.read(patterns: dataConfig.val, key: "data.val"),
                    try Tokenizers.forRun(configured: dataConfig.tokenizer, firstTrainingFile: trainFiles.first?.path))
        }
        let trainer = try Trainer(config: config, communicator: communicator, trainFiles: trainFiles, validationFiles: validationFiles)
        trainer.hooks = hooks
        self.trainer = trainer
        self.tokenizer = tokenizer
        if let tokenizer, tokenizer.tokenizer.vocabularySize > trainer.model.vocabularySize {
            throw TokenizerError.vocabularyMismatch(path: tokenizer.path, tokenizer: tokenizer.tokenizer.vocabularySize, model: trainer.model.vocabularySize)
        }
        let checkpoint = try TrainingRun.loadNewest(of: trusted, into: trainer, log: log)
        if resume && !candidates.isEmpty && checkpoint == nil {
            throw CheckpointError.notACheckpoint(path: runDirectory, reason: "none of its \(candidates.count) complete checkpoints could be loaded (see the warnings)")
        }
        metrics = try TrainingRun.prepare(runDirectory, config: trainer.config, resumeStep: checkpoint?.step, communicator: communicator)
    }

    /// The requested config with the architecture sections of the newest checkpoint whose
    /// manifest and config can be read (when resuming; newer ones that cannot are skipped with a
    /// warning, on every rank together), and the candidates from that one on. A request that
    /// changes the architecture is an error.
    static func resolve(_ requested: RunConfig, candidates: [String], communicator: Communicator,
                        log: (String) -> Void) throws -> (RunConfig, [String]) {
        for (index, newest) in candidates.enumerated() {
            let saved: RunConfig
            do {
                saved = try communicator.agree { try Checkpoint.config(of: try Checkpoint.readManifest(newest), directory: newest) }
            } catch let failure as AgreedFailure {
                log("warning: skipping checkpoint \(newest): \(failure); trying the previous one")
                continue
            }
            return (try resolve(requested, against: saved, from: newest), Array(candidates[index...]))
        }
        return (requested, [])
    }

    static func resolve(_ requested: RunConfig, against saved: RunConfig, from newest: String) throws -> RunConfig {
        var comparable = requested
        if comparable.model.vocabularySize == 0 { comparable.model.vocabularySize = saved.model.vocabularySize }
        let conflicts = comparable.differingKeys(from: saved, sections: TrainingRun.architectureSections)
        guard conflicts.isEmpty else { throw RunError.architectureConflict(checkpoint: newest, keys: conflicts) }
        var config = requested
        for section in TrainingRun.checkpointedSections { section(&config, saved) }
        return config
    }

    /// Every rank must train the same resolved config (a rank given other overrides or another
    /// config file would train and save another model): rank 0's digest of it is compared on every
    /// rank, and a rank that differs stops every rank with its message.
    static func checkRanksAgree(on config: RunConfig, communicator: Communicator) throws {
        let digest = SHA256.hex(of: Array(config.yaml(withHelp: false).utf8))
        var first = Array(digest.utf8)
        try first.withUnsafeMutableBytes { try communicator.broadcast($0, root: 0) }
        try communicator.agree {
            guard first == Array(digest.utf8) else { throw RunError.configMismatch(rank: communicator.rank) }
        }
    }

    /// Loads the newest of `candidates` every rank can read and verify into `trainer`, with its
    /// counters; a damaged one (truncated, flipped bytes, missing shard) is skipped with a
    /// warning, on every rank together. Returns the manifest loaded (nil: none).
    static func loadNewest(of candidates: [String], into trainer: Trainer, log: (String) -> Void) throws -> CheckpointManifest? {
        let started = DispatchTime.now().uptimeNanoseconds
        for directory in candidates {
            let manifest: CheckpointManifest
            do {
                manifest = try trainer.communicator.agree {
                    let manifest = try Checkpoint.readManifest(directory)
                    try Checkpoint.load(directory, manifest: manifest, model: trainer.model,
                                        replicatedOptimizer: trainer.replicatedOptimizer, expertOptimizer: trainer.expertOptimizer)
                    return manifest
                }
            } catch let failure as AgreedFailure {
                log("warning: skipping checkpoint \(directory): \(failure); trying the previous one")
                continue
            }
            try restore(manifest, of: directory, into: trainer, log: log)
            log(String(format: "resumed from %@ at step %d (saved on %d ranks), loaded and verified in %.2f s", directory,
                       manifest.step, manifest.worldSize, Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9))
            return manifest
        }
        return nil
    }

    /// The trainer's counters and phase from a loaded checkpoint's manifest, checked against
    /// the schedule.
    static func restore(_ manifest: CheckpointManifest, of directory: String, into trainer: Trainer, log: (String) -> Void) throws {
        var state = manifest.trainingState
        if manifest.trainingFlops == nil {
            // Written before compute was counted: the gate's nominal k experts per token.
            state.trainingFlops = Double(state.attempted * trainer.globalBatchTokens) * Benchmark.modelFlopsPerToken(trainer.model)
            log("note: \(directory) predates compute accounting; train_flops continues from the nominal estimate")
        }
        trainer.restore(state)
        // The schedule runs on applied updates (checkpoints before that change recorded it at
        // the attempted step; either matches).
        if let saved = manifest.temperature, let gate = trainer.model.moeLayers.first?.gate,
           let now = gate.temperature(step: state.applied),
           ![now, gate.temperature(step: state.attempted) ?? now].contains(where: { abs(saved - $0) <= 1e-12 * max(1, abs(saved)) }) {
            throw CheckpointError.incompatible(path: directory,
                                               reason: "its temperature \(saved) differs from the schedule's \(now) after \(state.applied) applied updates")
        }
    }

    /// Rank 0 creates the run directory, writes the resolved config and opens the metrics log
    /// (continued from `resumeStep`); nil on the other ranks.
    static func prepare(_ runDirectory: String, config: RunConfig, resumeStep: Int?, communicator: Communicator) throws -> MetricsLog? {
        guard communicator.rank == 0 else { return nil }
        do {
            try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
            try config.yaml().write(toFile: (runDirectory as NSString).appendingPathComponent("config.yaml"), atomically: true, encoding: .utf8)
        } catch {
            throw RunError.cannotCreate(path: runDirectory, reason: error.localizedDescription)
        }
        return try MetricsLog(path: (runDirectory as NSString).appendingPathComponent("metrics.jsonl"), resumeStep: resumeStep)
    }

    /// Trains to `train.steps` (or stops early after step `stopAt`, leaving the schedule as if the
    /// run went on, so `--resume` continues exactly); returns the final validation loss (nil
    /// without validation data). `stopRequested` is polled after every step (a signal handler's
    /// flag); when it is set on any rank, every rank finishes the same step, writes a checkpoint
    /// and returns.
    @discardableResult
    public func run(stopAt: Int? = nil, stopRequested: () -> Bool = { false }) throws -> Double? {
        let config = trainer.config, steps = config.train.steps
        let end = min(steps, stopAt ?? steps)
        announce()
        var lastValidation: Double?
        var intervalSeconds = 0.0, intervalTokens = 0, totalSeconds = 0.0, timedSteps = 0
        StallWatchdog(heartbeat: trainer.heartbeat, rank: communicator.rank, minimumSeconds: config.train.stallSeconds,
                      factor: config.train.stallFactor).start()
        try prepareSnapshot()
        while trainer.state.attempted < end {
            if config.train.evalEvery > 0 && trainer.state.attempted % config.train.evalEvery == 0 {
                lastValidation = try evaluate()
            }
            let started = DispatchTime.now().uptimeNanoseconds
            let report = try trainer.trainStep()
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
            trainer.heartbeat.finishedStep(seconds: seconds)
            health.observe(report, window: config.train.healthWindow, log: log)
            if report.skipped {
                log("warning: step \(report.step) skipped: non-finite loss or gradient (\(trainer.consecutiveSkips) in a row, \(trainer.state.skipped) in all)")
            }
            intervalSeconds += seconds
            intervalTokens += trainer.globalBatchTokens
            totalSeconds += seconds
            timedSteps += 1
            if report.step % config.train.logEvery == 0 || trainer.state.attempted == end {
                let tokensPerSecond = Double(intervalTokens) / max(intervalSeconds, 1e-9)
                record(report, tokensPerSecond: tokensPerSecond)
                logProgress(report, tokensPerSecond: tokensPerSecond,
                            remainingSeconds: Double(steps - trainer.state.attempted) * totalSeconds / Double(timedSteps))
                intervalSeconds = 0
                intervalTokens = 0
            }
            if try communicator.allReduce(Int64(stopRequested() ? 1 : 0), op: .max) != 0 {
                log("termination requested: stopping after step \(trainer.state.attempted) with a checkpoint; continue with --resume")
                try saveCheckpoint(inBackground: false)   // no evaluation: the scheduler's grace period is short
                return lastValidation
            }
            try completePendingSave(wait: false)
            if config.checkpoint.every > 0 && trainer.state.attempted % config.checkpoint.every == 0 && trainer.state.attempted < end {
                try saveCheckpoint(inBackground: config.checkpoint.async)
            }
        }
        lastValidation = try evaluate()
        log(String(format: "trained %d steps: %.4g TFLOP of model compute in %@ of training steps", trainer.state.attempted,
                   trainer.state.trainingFlops / 1e12, duration(trainer.state.trainingSeconds)))
        if end < steps { log("stopping at step \(end) of \(steps) as asked; continue with --resume") }
        try saveCheckpoint(inBackground: false)
        return lastValidation
    }

    /// The start-up lines: the model, the kernels, the batch and the steps.
    func announce() {
        let config = trainer.config, counts = trainer.model.parameterCounts
        log("model: \(format(counts.total)) parameters, \(format(counts.active)) active per token; "
            + "\(trainer.model.moeLayers.count) MoE layers of \(config.moe.experts) experts (gate \(config.moe.gate.rawValue), top-\(config.moe.topK)); "
            + "vocabulary \(trainer.model.vocabularySize)")
        if let kernels = trainer.model.kernels { log(kernels.summary) }
        let accumulation = config.train.gradAccum > 1 ? "x\(config.train.gradAccum) micro-batches" : ""
        log("ranks \(communicator.size), global batch \(communicator.size)\(accumulation)x\(config.train.batchSize)x\(config.model.context) = "
            + "\(trainer.globalBatchTokens) tokens, steps \(trainer.state.attempted)..<\(config.train.steps), run directory \(runDirectory)"
            + (trainer.model.moeLayers.first.map { "; MoE exchanges per direction: \($0.dispatchChunks)" } ?? ""))
    }

    /// The progress line of a logged step.
    func logProgress(_ report: StepReport, tokensPerSecond: Double, remainingSeconds: Double) {
        let steps = trainer.config.train.steps
        let active = report.moeLayers.isEmpty ? 0 : report.moeLayers.map(\.activeExperts).reduce(0, +) / Double(report.moeLayers.count)
        let gateText = (report.temperature.map { String(format: " | tau %.3f", $0) } ?? "")
            + String(format: " | %@ %.2f experts/token", report.phase.rawValue, active)
        log(String(format: "step %\(String(steps).count)d/%d | loss %.4f | aux %.4f | lr %.2e | norm %.2f | %@ tok/s | %@ left",
                   report.step, steps, report.loss, report.auxiliaryLoss, report.learningRate, report.gradientNorm,
                   format(Int(tokensPerSecond)), duration(remainingSeconds)) + gateText)
    }

    func evaluate() throws -> Double? {
        trainer.heartbeat.beat("evaluation", step: trainer.state.attempted)
        guard let loss = try trainer.evaluate() else { return nil }
        var record = MetricsRecord(step: trainer.state.attempted)
        record.validationLoss = loss
        record.trainingFlops = trainer.state.trainingFlops
        writeMetrics(record)
        log(String(format: "step %d | val_loss %.4f | perplexity %.2f", trainer.state.attempted, loss, exp(loss)))
        return loss
    }

    /// Saves the state after the current step; `inBackground`: the files are written while the
    /// next steps run and the save completes at a later step (`completePendingSave`). A save
    /// still in progress is completed first.
    func saveCheckpoint(inBackground: Bool) throws {
        try completePendingSave(wait: true)
        // Never rewrite a complete checkpoint (a resume that has nothing left to do).
        if Checkpoint.complete(in: runDirectory).last?.hasSuffix(Checkpoint.directoryName(step: trainer.state.attempted)) == true { return }
        trainer.heartbeat.beat("checkpoint save", step: trainer.state.attempted)
        let started = DispatchTime.now().uptimeNanoseconds
        let pending = try Checkpoint.begin(trainer.checkpointContents, communicator: communicator, runDirectory: runDirectory,
                                           attachments: tokenizer?.checkpointAttachment ?? [:], hooks: trainer.hooks,
                                           inBackground: inBackground, snapshot: snapshot)
        let blocked = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        if inBackground {
            pendingSave = (pending, blocked)
        } else {
            _ = try pending.complete(communicator: communicator, wait: true)
            log(String(format: "saved %@ in %.2f s", pending.directory, Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9))
        }
    }

    /// The memory asynchronous saves snapshot into, kept between saves (`SnapshotBuffer`).
    lazy var snapshot: CheckpointSnapshot? = trainer.config.checkpoint.async ? CheckpointSnapshot() : nil

    /// Asynchronous saves: maps and touches the snapshot's memory before the first step (one
    /// encoding of the state, thrown away), so no step pays its first-touch page faults.
    func prepareSnapshot() throws {
        guard let snapshot, trainer.config.checkpoint.every > 0 else { return }
        let started = DispatchTime.now().uptimeNanoseconds
        try Checkpoint.prepare(snapshot, for: trainer.checkpointContents, communicator: communicator)
        log(String(format: "asynchronous checkpoints: snapshot memory mapped in %.2f s", Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9))
    }

    /// A background save and the seconds its snapshot held the steps up.
    var pendingSave: (save: PendingCheckpoint, blocked: Double)?

    /// Completes a background save when every rank has written its files (or, with `wait`, once
    /// they have); collective, every step while one is in progress.
    func completePendingSave(wait: Bool) throws {
        guard let (pending, blocked) = pendingSave else { return }
        let started = DispatchTime.now().uptimeNanoseconds
        guard let directory = try pending.complete(communicator: communicator, wait: wait) else { return }
        pendingSave = nil
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - pending.started.uptimeNanoseconds) / 1e9
        log(String(format: "saved %@ in the background in %.2f s (steps held up %.2f s)", directory, seconds,
                   blocked + Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9))
    }

    func record(_ report: StepReport, tokensPerSecond: Double) {
        guard metrics != nil else { return }
        let layers = report.moeLayers
        func mean(_ values: [Double]) -> Double { values.isEmpty ? 0 : values.reduce(0, +) / Double(values.count) }
        var record = MetricsRecord(step: report.step)
        record.loss = report.loss
        record.learningRate = report.learningRate
        record.tokensPerSecond = tokensPerSecond
        record.auxiliaryLoss = report.auxiliaryLoss
        record.droppedFraction = mean(layers.map(\.droppedFraction))
        record.expertLoad = layers.map(\.expertLoad)
        let biases = trainer.model.moeLayers.compactMap(\.gate.selectionBias)
        if !biases.isEmpty { record.expertBias = biases }
        record.activeExperts = mean(layers.map(\.activeExperts))
        record.gradientNorm = report.gradientNorm
        record.temperature = report.temperature
        record.phase = report.phase
        record.skippedUpdates = trainer.state.skipped
        record.trainingFlops = trainer.state.trainingFlops
        record.trainingSeconds = trainer.state.trainingSeconds
        record.loadCoefficientOfVariation = layers.map { ExpertHealth.coefficientOfVariation($0.expertLoad) }
        if layers.contains(where: { $0.routerEntropy != nil }) { record.routerEntropy = layers.map(\.routerEntropy) }
        writeMetrics(record)
    }

    /// A record that cannot be written (a full disk) is left out with a warning: the run goes on,
    /// and its checkpoint save will say whether the disk can still hold the run.
    func writeMetrics(_ record: MetricsRecord) {
        do { try metrics?.write(record) } catch { log("warning: \(error)") }
    }

    func format(_ count: Int) -> String {
        switch count {
        case 1_000_000...: return String(format: "%.2fM", Double(count) / 1e6)
        case 10_000...: return String(format: "%.1fK", Double(count) / 1e3)
        default: return "\(count)"
        }
    }
}

/// Seconds as "45s", "12m34s" or "2h05m".
func duration(_ seconds: Double) -> String {
    let whole = Int(seconds.rounded())
    return whole >= 3600 ? "\(whole / 3600)h\(String(format: "%02d", whole / 60 % 60))m"
        : whole >= 60 ? "\(whole / 60)m\(String(format: "%02d", whole % 60))s" : "\(whole)s"
}

extension Trainer {
    /// What a checkpoint of this trainer saves.
    public var checkpointContents: CheckpointContents {
        CheckpointContents(model: model, replicatedOptimizer: replicatedOptimizer, expertOptimizer: expertOptimizer,
                           state: state, config: config, withAllReplicatedValues: { try self.withAllReplicatedValues($0) })
    }
}
