import Foundation
import MoEComm
import MoEIO

/// The training loop around `Trainer.step`: resume, evaluation, metrics, progress line and
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
        public var description: String {
            switch self {
            case let .architectureConflict(checkpoint, keys):
                return "cannot resume from '\(checkpoint)': the config changes \(keys.joined(separator: ", ")), which must match the checkpoint (drop those --set overrides or start a new run directory)"
            case let .cannotCreate(path, reason): return "run directory '\(path)': \(reason)"
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
                faults: [FaultInjection] = [], log: @escaping (String) -> Void) throws {
        self.runDirectory = runDirectory
        self.communicator = communicator
        self.log = log
        var config = requested
        var checkpoint: (directory: String, manifest: CheckpointManifest)?
        // Newest complete checkpoint first; the architecture comes from it.
        let candidates = resume ? Array(Checkpoint.complete(in: runDirectory).reversed()) : []
        if resume && candidates.isEmpty {
            log("--resume: no complete checkpoint in \(runDirectory)/checkpoints; starting from step 0")
        }
        if let newest = candidates.first {
            let manifest = try Checkpoint.readManifest(newest)
            let saved = try Checkpoint.config(of: manifest, directory: newest)
            var comparable = requested
            if comparable.model.vocabularySize == 0 { comparable.model.vocabularySize = saved.model.vocabularySize }
            let conflicts = comparable.differingKeys(from: saved, sections: TrainingRun.architectureSections)
            guard conflicts.isEmpty else { throw RunError.architectureConflict(checkpoint: newest, keys: conflicts) }
            for section in TrainingRun.checkpointedSections { section(&config, saved) }
        }
        // Every rank reads the data itself; a file one node cannot read stops every rank with
        // that node's message (before any other collective).
        let dataConfig = config.data
        let (trainFiles, validationFiles, tokenizer) = try communicator.agree {
            if faults.contains(where: { $0.kind == .dataUnreadable && $0.rank == communicator.rank }) {
                throw TokenFile.ReadError.unreadable(path: dataConfig.train.first ?? "")
            }
            let trainFiles = try TokenFile.read(patterns: dataConfig.train, key: "data.train")
            return (trainFiles, try TokenFile.read(patterns: dataConfig.val, key: "data.val"),
                    try Tokenizers.forRun(configured: dataConfig.tokenizer, firstTrainingFile: trainFiles.first?.path))
        }
        trainer = try Trainer(config: config, communicator: communicator, trainFiles: trainFiles, validationFiles: validationFiles)
        self.tokenizer = tokenizer
        if let tokenizer, tokenizer.tokenizer.vocabularySize > trainer.model.vocabularySize {
            throw TokenizerError.vocabularyMismatch(path: tokenizer.path, tokenizer: tokenizer.tokenizer.vocabularySize, model: trainer.model.vocabularySize)
        }
        // Load the newest checkpoint every rank can read and verify; a damaged one (truncated,
        // flipped bytes, missing shard) is skipped with a warning, on every rank together.
        let loadStarted = DispatchTime.now().uptimeNanoseconds
        let trainer = self.trainer
        for directory in candidates {
            do {
                let manifest = try communicator.agree {
                    let manifest = try Checkpoint.readManifest(directory)
                    try Checkpoint.load(directory, manifest: manifest, model: trainer.model,
                                        replicatedOptimizer: trainer.replicatedOptimizer, expertOptimizer: trainer.expertOptimizer)
                    return manifest
                }
                checkpoint = (directory, manifest)
                break
            } catch let failure as AgreedFailure {
                log("warning: skipping checkpoint \(directory): \(failure); trying the previous one")
            }
        }
        if resume && !candidates.isEmpty && checkpoint == nil {
            throw CheckpointError.notACheckpoint(path: runDirectory, reason: "none of its \(candidates.count) complete checkpoints could be loaded (see the warnings)")
        }
        if let checkpoint {
            trainer.step = checkpoint.manifest.step
            trainer.skippedUpdates = checkpoint.manifest.skippedUpdates ?? 0
            if let flops = checkpoint.manifest.trainingFlops {
                trainer.trainingFlops = flops
                trainer.trainingSeconds = checkpoint.manifest.trainingSeconds ?? 0
            } else {
                // Written before compute was counted: the gate's nominal k experts per token.
                trainer.trainingFlops = Double(trainer.step * trainer.globalBatchTokens) * Benchmark.modelFlopsPerToken(trainer.model)
                log("note: \(checkpoint.directory) predates compute accounting; train_flops continues from the nominal estimate")
            }
            trainer.restorePhase()
            // The schedule runs on applied updates (checkpoints before that change recorded it at
            // the attempted step; either matches).
            if let saved = checkpoint.manifest.temperature, let gate = trainer.model.moeLayers.first?.gate,
               let now = gate.temperature(step: trainer.appliedUpdates),
               ![now, gate.temperature(step: trainer.step) ?? now].contains(where: { abs(saved - $0) <= 1e-12 * max(1, abs(saved)) }) {
                throw CheckpointError.incompatible(path: checkpoint.directory,
                                                   reason: "its temperature \(saved) differs from the schedule's \(now) after \(trainer.appliedUpdates) applied updates")
            }
            log(String(format: "resumed from %@ at step %d (saved on %d ranks), loaded and verified in %.2f s", checkpoint.directory,
                       trainer.step, checkpoint.manifest.worldSize, Double(DispatchTime.now().uptimeNanoseconds - loadStarted) / 1e9))
        }
        if communicator.rank == 0 {
            do {
                try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
                try trainer.config.yaml().write(toFile: (runDirectory as NSString).appendingPathComponent("config.yaml"),
                                                atomically: true, encoding: .utf8)
            } catch {
                throw RunError.cannotCreate(path: runDirectory, reason: error.localizedDescription)
            }
            metrics = try MetricsLog(path: (runDirectory as NSString).appendingPathComponent("metrics.jsonl"),
                                     resumeStep: checkpoint.map { $0.manifest.step })
        } else {
            metrics = nil
        }
    }

    /// Trains to `train.steps` (or stops early after step `stopAt`, leaving the schedule as if the
    /// run went on, so `--resume` continues exactly); returns the final validation loss (nil
    /// without validation data).
    @discardableResult
    /// `stopRequested` is polled after every step (a signal handler's flag); when it is set on any
    /// rank, every rank finishes the same step, writes a checkpoint and returns.
    public func run(stopAt: Int? = nil, stopRequested: () -> Bool = { false }) throws -> Double? {
        let config = trainer.config, steps = config.train.steps
        let end = min(steps, stopAt ?? steps)
        let counts = trainer.model.parameterCounts
        log("model: \(format(counts.total)) parameters, \(format(counts.active)) active per token; "
            + "\(trainer.model.moeLayers.count) MoE layers of \(config.moe.experts) experts (gate \(config.moe.gate.rawValue), top-\(config.moe.topK)); "
            + "vocabulary \(trainer.model.vocabularySize)")
        if let kernels = trainer.model.kernels { log(kernels.summary) }
        let accumulation = config.train.gradAccum > 1 ? "x\(config.train.gradAccum) micro-batches" : ""
        log("ranks \(communicator.size), global batch \(communicator.size)\(accumulation)x\(config.train.batchSize)x\(config.model.context) = "
            + "\(trainer.globalBatchTokens) tokens, steps \(trainer.step)..<\(steps), run directory \(runDirectory)"
            + (trainer.model.moeLayers.first.map { "; MoE exchanges per direction: \($0.dispatchChunks)" } ?? ""))
        var lastValidation: Double?
        var intervalSeconds = 0.0, intervalTokens = 0, totalSeconds = 0.0, timedSteps = 0
        StallWatchdog(heartbeat: trainer.heartbeat, rank: communicator.rank, minimumSeconds: config.train.stallSeconds,
                      factor: config.train.stallFactor).start()
        while trainer.step < end {
            if config.train.evalEvery > 0 && trainer.step % config.train.evalEvery == 0 {
                lastValidation = try evaluate()
            }
            let started = DispatchTime.now().uptimeNanoseconds
            let report = try trainer.trainStep()
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
            trainer.heartbeat.finishedStep(seconds: seconds)
            health.observe(report, window: config.train.healthWindow, log: log)
            if report.skipped {
                log("warning: step \(report.step) skipped: non-finite loss or gradient (\(trainer.consecutiveSkips) in a row, \(trainer.skippedUpdates) in all)")
            }
            intervalSeconds += seconds
            intervalTokens += trainer.globalBatchTokens
            totalSeconds += seconds
            timedSteps += 1
            if report.step % config.train.logEvery == 0 || trainer.step == end {
                let tokensPerSecond = Double(intervalTokens) / max(intervalSeconds, 1e-9)
                record(report, tokensPerSecond: tokensPerSecond)
                let remaining = Double(steps - trainer.step) * totalSeconds / Double(timedSteps)
                let active = report.moeLayers.isEmpty ? 0 : report.moeLayers.map(\.activeExperts).reduce(0, +) / Double(report.moeLayers.count)
                let gateText = (report.temperature.map { String(format: " | tau %.3f", $0) } ?? "")
                    + String(format: " | %@ %.2f experts/token", report.phase.rawValue, active)
                log(String(format: "step %\(String(steps).count)d/%d | loss %.4f | aux %.4f | lr %.2e | norm %.2f | %@ tok/s | %@ left",
                           report.step, steps, report.loss, report.auxiliaryLoss, report.learningRate, report.gradientNorm,
                           format(Int(tokensPerSecond)), duration(remaining)) + gateText)
                intervalSeconds = 0
                intervalTokens = 0
            }
            if try communicator.allReduce(Int64(stopRequested() ? 1 : 0), op: .max) != 0 {
                log("termination requested: stopping after step \(trainer.step) with a checkpoint; continue with --resume")
                try saveCheckpoint()   // no evaluation: the scheduler's grace period is short
                return lastValidation
            }
            if config.checkpoint.every > 0 && trainer.step % config.checkpoint.every == 0 && trainer.step < end {
                try saveCheckpoint()
            }
        }
        lastValidation = try evaluate()
        log(String(format: "trained %d steps: %.4g TFLOP of model compute in %@ of training steps", trainer.step,
                   trainer.trainingFlops / 1e12, duration(trainer.trainingSeconds)))
        if end < steps { log("stopping at step \(end) of \(steps) as asked; continue with --resume") }
        try saveCheckpoint()
        return lastValidation
    }

    func evaluate() throws -> Double? {
        trainer.heartbeat.beat("evaluation", step: trainer.step)
        guard let loss = try trainer.evaluate() else { return nil }
        var object = JSONObject()
        object.add("step", trainer.step)
        object.add("val_loss", loss)
        object.add("train_flops", trainer.trainingFlops)
        metrics?.write(object)
        log(String(format: "step %d | val_loss %.4f | perplexity %.2f", trainer.step, loss, exp(loss)))
        return loss
    }

    func saveCheckpoint() throws {
        // Never rewrite a complete checkpoint (a resume that has nothing left to do).
        if Checkpoint.complete(in: runDirectory).last?.hasSuffix(Checkpoint.directoryName(step: trainer.step)) == true { return }
        trainer.heartbeat.beat("checkpoint save", step: trainer.step)
        let started = DispatchTime.now().uptimeNanoseconds
        let directory = try Checkpoint.save(trainer, runDirectory: runDirectory,
                                                attachments: tokenizer.map { [$0.checkpointName: $0.contents] } ?? [:])
        log(String(format: "saved %@ in %.2f s", directory, Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9))
    }

    func record(_ report: StepReport, tokensPerSecond: Double) {
        guard let metrics else { return }
        var object = JSONObject()
        object.add("step", report.step)
        object.add("loss", report.loss)
        object.add("lr", report.learningRate)
        object.add("tokens_per_sec", tokensPerSecond)
        object.add("aux_loss", report.auxiliaryLoss)
        let layers = report.moeLayers
        let dropped = layers.isEmpty ? 0 : layers.map(\.droppedFraction).reduce(0, +) / Double(layers.count)
        object.add("dropped_fraction", dropped)
        object.add("expert_load", layers.map(\.expertLoad))
        object.add("active_experts", layers.isEmpty ? 0 : layers.map(\.activeExperts).reduce(0, +) / Double(layers.count))
        object.add("grad_norm", report.gradientNorm)
        if let temperature = report.temperature { object.add("temperature", temperature) }
        object.add("phase", report.phase.rawValue)
        object.add("skipped_updates", trainer.skippedUpdates)
        object.add("train_flops", trainer.trainingFlops)
        object.add("train_seconds", trainer.trainingSeconds)
        object.add("load_cv", layers.map { ExpertHealth.coefficientOfVariation($0.expertLoad) })
        if layers.contains(where: { $0.routerEntropy != nil }) { object.add("router_entropy", layers.map { $0.routerEntropy ?? .nan }) }
        metrics.write(object)
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
