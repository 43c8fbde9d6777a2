import MoEComm
import MoEIO

/// `moe upcycle` (sparse upcycling, Komatsuzaki et al. 2023): a dense model becomes an MoE
/// model whose every block's FFN is copied into E experts behind a fresh router (softmax top-k,
/// renormalised over the k). With identical copies the MoE computes what the dense model did
/// (the k weights sum to 1); EvoMoE's diversify (docs/ALGORITHMS.md 4.1: masks and noise) makes
/// the copies differ from the start. Everything else (embeddings, norms, attention, head) is
/// copied by name.
public enum Upcycling {
    public struct Options: Sendable {
        public var experts: Int
        public var topK: Int
        /// EvoMoE's mask ratio, noise and rescaling (nil: identical copies).
        public var diversify: EvoMoEConfig?
        public init(experts: Int, topK: Int, diversify: EvoMoEConfig?) {
            (self.experts, self.topK, self.diversify) = (experts, topK, diversify)
        }
    }

    public enum UpcycleError: Error, CustomStringConvertible {
        case notDense(String)
        case expertSize(Int, Int)
        case override(String)
        public var description: String {
            switch self {
            case let .notDense(source): return "upcycle: '\(source)' already has experts (model.moe_every > 0); upcycling starts from a dense model"
            case let .expertSize(expert, dense):
                return "upcycle: moe.expert_hidden \(expert) differs from the dense FFN's \(dense): the experts are copies of it"
            case let .override(what): return "upcycle: the --set overrides \(what)"
            }
        }
    }

    /// The MoE config of dense `config`: an MoE in every block, `options`' experts and top-k,
    /// softmax top-k renormalised, evaluated dropless; then `overrides` (`key=value`).
    public static func config(from dense: RunConfig, source: String, options: Options, overrides: [String]) throws -> RunConfig {
        guard dense.model.moeEvery == 0 else { throw UpcycleError.notDense(source) }
        var config = dense
        config.model.moeEvery = 1
        config.moe.experts = options.experts
        config.moe.topK = options.topK
        config.moe.gate = .topk
        config.moe.renormalize = .beforeDrop
        config.moe.evalCapacityFactor = nil
        config.evomoe.spawnFraction = 0
        if let diversify = options.diversify { config.evomoe = diversify; config.evomoe.spawnFraction = 0 }
        try config.apply(overrides: overrides)
        if let hidden = config.moe.expertHidden, hidden != config.model.ffnHidden {
            throw UpcycleError.expertSize(hidden, config.model.ffnHidden)
        }
        // The dense model's blocks are copied: only which of them become MoEs may change.
        var blocks = config
        blocks.model.moeEvery = dense.model.moeEvery
        let changed = blocks.differingKeys(from: dense, sections: ["model"])
        guard changed.isEmpty else { throw UpcycleError.override("change the dense model's \(changed.joined(separator: ", "))") }
        guard config.model.moeEvery > 0 else { throw UpcycleError.override("leave no block with experts (model.moe_every 0)") }
        guard config.evomoe.spawnFraction == 0 else {
            throw UpcycleError.override("set evomoe.spawn_fraction: the experts come from the dense model, not from a dense phase")
        }
        return config
    }

    /// Writes `moe` (built from `config(from:...)` on one rank, its parameters initialised) from
    /// `dense`: the parameters both have by name (blocks that stay dense included), each MoE
    /// block's FFN into every expert; what only the MoE model has (routers, shared experts) keeps
    /// its initialisation.
    public static func upcycle(_ dense: GPTModel<Float>, into moe: GPTModel<Float>, options: Options, seed: Int) {
        precondition(moe.placement.localExperts.count == moe.moeConfig.experts, "upcycling builds every expert on one rank")
        var denseEntries: [String: (values: UnsafeMutablePointer<Float>, count: Int)] = [:]
        for entry in dense.replicated.entries { denseEntries[entry.name] = (dense.replicated.values + entry.offset, entry.count) }
        for entry in moe.replicated.entries {
            guard let source = denseEntries[entry.name] else { continue }
            precondition(source.count == entry.count, "\(entry.name): \(source.count) values against \(entry.count)")
            (moe.replicated.values + entry.offset).update(from: source.values, count: entry.count)
        }
        let recipe = self.recipe(options.diversify ?? EvoMoEConfig.identicalCopies)
        let key = RandomKey(UInt64(seed)).derive("upcycle")
        for (layer, block) in dense.blocks.enumerated() {
            guard case let .moe(moeLayer) = moe.blocks[layer].feedForward else { continue }
            guard case let .dense(ffn) = block.feedForward else { preconditionFailure("block \(layer) of the dense model has experts") }
            for (expert, target) in moeLayer.experts.enumerated() {
                recipe.diversify(ffn, into: target, stream: key.derive(layer, expert))
            }
        }
        moe.replicated.didWriteAllValues()
        moe.experts.didWriteAllValues()
    }

    /// EvoMoE's recipe with `settings`: its diversify step makes the copies.
    static func recipe(_ settings: EvoMoEConfig) -> EvoMoERecipe {
        var run = RunConfig()
        run.evomoe = settings
        run.evomoe.spawnFraction = 0
        return EvoMoERecipe(run)
    }

    /// `moe upcycle`: the dense model of `source` (a SwiftMoE checkpoint or run directory, or a
    /// transformers directory of a dense Llama, Mistral or Qwen3) as an MoE model, saved as step 0
    /// of `runDirectory`. Returns the checkpoint directory and the MoE config.
    public static func upcycle(from source: String, checkpoint: String?, to runDirectory: String, options: Options,
                               overrides: [String]) throws -> (checkpoint: String, config: RunConfig, notes: [String]) {
        let single = SingleRankCommunicator()
        let dense: GPTModel<Float>, tokenizer: TokenizerFile?, notes: [String]
        if let checkpoint {
            let manifest = try Checkpoint.readManifest(checkpoint)
            let config = try Checkpoint.config(of: manifest, directory: checkpoint)
            guard config.model.moeEvery == 0 else { throw UpcycleError.notDense(checkpoint) }
            dense = try GPTModel<Float>(config, vocabularySize: manifest.vocabularySize, communicator: single)
            try Checkpoint.load(checkpoint, manifest: manifest, model: dense)
            (tokenizer, notes) = (try Checkpoint.tokenizer(checkpoint, manifest: manifest), [])
        } else {
            let imported = try HuggingFaceImport.source(source)
            guard !imported.isMoE else { throw UpcycleError.notDense(source) }
            dense = try GPTModel<Float>(imported.config, vocabularySize: imported.config.model.vocabularySize, communicator: single)
            dense.initializeParameters(seed: imported.config.train.seed)
            try HuggingFaceImport.load(imported, into: dense)
            (tokenizer, notes) = HuggingFaceImport.tokenizer(of: source)
        }
        let config = try self.config(from: dense.run, source: source, options: options, overrides: overrides)
        let moe = try GPTModel<Float>(config, vocabularySize: dense.vocabularySize, communicator: single)
        moe.initializeParameters(seed: config.train.seed)
        upcycle(dense, into: moe, options: options, seed: config.train.seed)
        return (try StartingCheckpoint.save(moe, runDirectory: runDirectory, tokenizer: tokenizer), config, notes)
    }
}

extension EvoMoEConfig {
    /// Diversify settings that copy exactly: nothing masked, no noise.
    static var identicalCopies: EvoMoEConfig {
        var config = EvoMoEConfig()
        (config.maskRatio, config.noise, config.rescale) = (0, 0, false)
        return config
    }
}
