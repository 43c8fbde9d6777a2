import Foundation
import Yams

/// Architecture. `vocab_size: 0` takes the vocabulary from the training data.
public struct ModelConfig: Equatable, Sendable {
    public init() {}
    public var vocabularySize = 0
    public var context = 128
    public var width = 256
    public var layers = 4
    public var heads = 4
    public var ffnHidden = 512
    public var moeEvery = 1
    public var tieEmbeddings = true
    public var architecture = Architecture.gpt2
    /// Key/value heads of grouped-query attention (llama); nil: one per query head.
    public var kvHeads: Int? = nil
    public var ropeTheta = 10_000.0
    public var normEpsilon = 1e-5
    public var queryKeyNorm = QueryKeyNorm.none

    /// Key/value heads in effect.
    public var keyValueHeads: Int { kvHeads ?? heads }
}

/// The mixture-of-experts blocks and their gate.
public struct MoEConfig: Equatable, Sendable {
    public init() {}
    public var experts = 8
    public var topK = 2
    public var gate = GateKind.dts
    public var capacityFactor: Double? = 1.25
    public var evalCapacityFactor: Double? = 2.0
    public var minCapacity = 4
    public var renormalize = Renormalization.beforeDrop
    public var balanceLoss = 0.01
    public var zLoss = 0.0
    public var jitter = 0.0
    public var gshardSecond = SecondChoicePolicy.sampling
    /// Hidden size of each routed expert; nil: model.ffn_hidden (fine-grained experts: smaller).
    public var expertHidden: Int? = nil
    public var sharedExperts = 0
    /// Hidden size of each shared expert; nil: the routed experts'.
    public var sharedHidden: Int? = nil
    public var sharedGate = false
    public var score = ScoreFunction.softmax
    public var routedScale = 1.0
    public var biasUpdateRate = 0.0
    public var sequenceBalanceLoss = 0.0
    public var expertGroups = 1
    public var groupLimit = 0
}

/// EvoMoE's expert-diversify phase (docs/ALGORITHMS.md 4.1): train one dense FFN per MoE position,
/// then spawn the experts from it. Works with any gate; `configs/shakespeare.yaml` pairs it with dts.
public struct EvoMoEConfig: Equatable, Sendable {
    public init() {}
    public var spawnFraction = 0.05
    public var maskRatio = 0.5
    public var noise = 0.01
    public var rescale = true
}

/// The Dense-To-Sparse gates' schedule and selection (docs/ALGORITHMS.md 4.2 and 10).
public struct DenseToSparseConfig: Equatable, Sendable {
    public init() {}
    public var tauMax = 2.0
    public var tauMin = 0.5
    public var schedule = TemperatureScheduleKind.linear
    public var annealFraction = 0.5
    public var hardFraction = 0.75
    public var threshold = 0.2
    public var weights = DenseToSparseWeights.probability
    public var auxLoss = 0.01
    public var activationTauMax = 1.0
    public var activationTauMin = 0.05
    public var activation = GateActivation.sigmoid
}

/// Parameters of the other gates (docs/ALGORITHMS.md 5-9).
public struct GateOptionsConfig: Equatable, Sendable {
    public init() {}
    public var hashTable = HashTableKind.random
    public var baseEpsilon = 0.0078125
    public var stableStage2Fraction = 0.06
    public var stableDistillDimension = 50
    public var stableBalance = 0.3
    public var stableDistill = 0.3
    public var stableCapacityFactor = 2.0
    public var expertChoiceCapacity = 2.0
    public var allowNonCausal = false
    public var reluInitialLambda = 1e-8
    public var reluMultiplier = 1.2
    public var reluTargetSparsity = 0.0
}

public struct TrainConfig: Equatable, Sendable {
    public init() {}
    public var steps = 2000
    public var batchSize = 8
    public var gradAccum = 1
    public var shardOptimizer = false
    public var overlapAllReduce = true
    /// nil: auto (1 when every rank runs on one host, else 4).
    public var dispatchChunks: Int? = nil
    public var attentionTile = 128
    public var seed = 1337
    public var learningRate = 1e-3
    public var minLearningRate = 1e-4
    public var warmupSteps = 100
    public var weightDecay = 0.1
    public var beta1 = 0.9
    public var beta2 = 0.95
    public var epsilon = 1e-8
    public var gradClip = 1.0
    public var decayEmbeddings = false
    public var decayNormsAndBiases = false
    public var logEvery = 10
    public var evalEvery = 250
    public var evalBatches = 16
    public var consistencyCheckEvery = 100
    public var maxConsecutiveSkips = 5
    public var stallSeconds = 300.0
    public var stallFactor = 20.0
    public var healthWindow = 100
    public var precision = PrecisionSetting.auto
    public var kernel = KernelSetting.auto
}

public struct DataConfig: Equatable, Sendable {
    public init() {}
    /// Each a token file, a glob (`data/fineweb/train_*.bin`) or a list of either.
    public var train = ["data/shakespeare/train.bin"]
    public var val = ["data/shakespeare/val.bin"]
    /// The tokenizer of the token files; empty: `tokenizer.json` beside the first training file
    /// if there is one (byte-level data needs none).
    public var tokenizer = ""
}

public struct CheckpointConfig: Equatable, Sendable {
    public init() {}
    public var every = 500
    public var keep = 2
    public var async = false
}

public extension RunConfig {
    /// T_s: the update at which EvoMoE spawns the experts from the dense FFNs (0: no dense phase).
    var spawnStep: Int {
        evomoe.spawnFraction > 0 ? max(1, Int((evomoe.spawnFraction * Double(train.steps)).rounded())) : 0
    }
}

/// A whole run's configuration. The defaults are the embedded main job (EvoMoE on Shakespeare:
/// 5% dense, then 8 experts under the Dense-To-Sparse gate); `configs/shakespeare.yaml` spells
/// the same values out.
public struct RunConfig: Equatable, Sendable {
    public var model = ModelConfig()
    public var moe = MoEConfig()
    public var train = TrainConfig()
    public var data = DataConfig()
    public var checkpoint = CheckpointConfig()
    public var evomoe = EvoMoEConfig()
    public var dts = DenseToSparseConfig()
    public var gates = GateOptionsConfig()

    public init() {}

    public static let sections: [ConfigSection<RunConfig>] = [
        ConfigSection("model", \.model, help: "Architecture: a pre-norm decoder, GPT-2 or Llama style (docs/ARCHITECTURE.md).", [
            .choice("architecture", \.architecture,
                    "gpt2: LayerNorm, learned positions, GELU, biases; llama: RMSNorm, rotary positions, SwiGLU, no biases (Mixtral, Qwen-MoE, OLMoE)"),
            .int("vocab_size", \.vocabularySize, min: 0, "vocabulary size; 0 takes it from the training token file"),
            .int("context", \.context, min: 1, max: 65536, "tokens per sequence (T)"),
            .int("width", \.width, min: 1, "model width (C)"),
            .int("layers", \.layers, min: 1, "transformer blocks"),
            .int("heads", \.heads, min: 1, "attention heads; must divide width"),
            .int("ffn_hidden", \.ffnHidden, min: 1, "hidden size of every FFN and expert (H)"),
            .int("moe_every", \.moeEvery, min: 0, "every n-th block's FFN is an MoE layer (1: all, 2: blocks 2, 4, ...; 0: none)"),
            .bool("tie_embeddings", \.tieEmbeddings, "share the token embedding with the output projection"),
            .optionalInt("kv_heads", \.kvHeads, min: 1, "llama: key/value heads of grouped-query attention, dividing heads; auto = heads"),
            .double("rope_theta", \.ropeTheta, 1...1e12, "llama: base of the rotary position embedding's frequencies"),
            .double("norm_epsilon", \.normEpsilon, 1e-12...1e-1, "epsilon of every LayerNorm (gpt2) or RMSNorm (llama)"),
            .choice("qk_norm", \.queryKeyNorm,
                    "llama: RMSNorm on queries and keys before the rotation: none, head (each head, Qwen3) or full (the whole projection, OLMoE)"),
        ]),
        ConfigSection("moe", \.moe, help: "Mixture-of-experts layers and their gate (docs/ALGORITHMS.md).", [
            .int("experts", \.experts, min: 1, "experts per MoE layer (E)"),
            .int("top_k", \.topK, min: 1, "experts per token (k); at most experts"),
            .choice("gate", \.gate, "the gate (router) of every MoE layer; the table of gates is in the README, their math in docs/ALGORITHMS.md"),
            .optionalDouble("capacity_factor", \.capacityFactor, 0.01...1e6,
                            "training capacity factor CF: slots per expert = max(min_capacity, ceil(k*CF*N/E)); none = dropless"),
            .optionalDouble("eval_capacity_factor", \.evalCapacityFactor, 0.01...1e6, "capacity factor for evaluation and generation; none = dropless"),
            .int("min_capacity", \.minCapacity, min: 0, "lower bound on slots per expert"),
            .choice("renormalize", \.renormalize,
                    "top-k weights: none (raw p), before_drop (softmax over the k), after_drop (over the kept)"),
            .double("balance_loss", \.balanceLoss, 0...100, "coefficient of the Switch load-balancing loss"),
            .double("z_loss", \.zLoss, 0...100, "coefficient of the router z-loss (ST-MoE); 1e-3 is typical"),
            .double("jitter", \.jitter, 0...0.5, "topk/switch/gshard: the router sees x * U(1-j, 1+j) while training (Switch's 0.01); 0 = off"),
            .choice("gshard_second", \.gshardSecond,
                    "gshard's second expert: sampling (Gumbel over the rest), argmax, or random (kept with probability 2 p2/(p1+p2))"),
            .optionalInt("expert_hidden", \.expertHidden, min: 1, "hidden size of each routed expert; auto = model.ffn_hidden (fine-grained experts: smaller, more of them, larger top_k)"),
            .int("shared_experts", \.sharedExperts, min: 0, "always-on experts every token passes through, replicated, added to the routed output (DeepSeek, Qwen2-MoE)"),
            .optionalInt("shared_hidden", \.sharedHidden, min: 1, "hidden size of each shared expert; auto = the routed experts'"),
            .bool("shared_gate", \.sharedGate, "scale the shared experts' output by a learned sigmoid(x w) per token (Qwen2-MoE)"),
            .choice("score", \.score, "topk: the router's affinities, softmax over the experts or an independent sigmoid per expert (DeepSeek-V3)"),
            .double("routed_scale", \.routedScale, 1e-3...1e3, "topk: the routed experts' weights are multiplied by this (DeepSeek-V3's routed scaling factor)"),
            .double("bias_update_rate", \.biasUpdateRate, 0...1,
                    "topk: loss-free balancing: a per-expert bias added to the scores for selection only moves by this after each update, up for underloaded experts, down for overloaded (DeepSeek-V3's 1e-3); 0 = off"),
            .double("sequence_balance_loss", \.sequenceBalanceLoss, 0...100, "topk: coefficient of DeepSeek-V3's sequence-wise balance loss (per sequence f_e P_e over normalised affinities); 0 = off"),
            .int("expert_groups", \.expertGroups, min: 1, "topk: experts in this many consecutive groups (with groups = ranks, a group is a rank's experts); 1 = no grouping"),
            .int("group_limit", \.groupLimit, min: 0,
                    "topk: each token keeps the top group_limit groups by the sum of its two best scores in each, then its top_k inside them (DeepSeek-V3's node limit); 0 = every group"),
        ]),
        ConfigSection("evomoe", \.evomoe, help: "EvoMoE expert-diversify: a dense FFN per MoE position first, then E experts spawned from it.", [
            .double("spawn_fraction", \.spawnFraction, 0...0.99, "fraction of train.steps trained dense before spawning the experts (T_s); 0 = start sparse"),
            .double("mask_ratio", \.maskRatio, 0...0.95, "r: each spawned expert keeps each weight with probability 1 - r"),
            .double("noise", \.noise, 0...1, "spawned weights get noise N(0, (noise * rms W)^2)"),
            .bool("rescale", \.rescale, "divide masked weights by 1 - r"),
        ]),
        ConfigSection("dts", \.dts, help: "Dense-To-Sparse gates (dts and activation_dts): temperature schedule, threshold selection, hard top-1.", [
            .double("tau_max", \.tauMax, 1e-3...1e4, "dts: starting temperature"),
            .double("tau_min", \.tauMin, 1e-3...1e4, "dts: final temperature"),
            .choice("schedule", \.schedule, "how the temperature falls from tau_max to tau_min"),
            .double("anneal_fraction", \.annealFraction, 1e-6...1, "D: annealing length as a fraction of train.steps, counted from the spawn"),
            .double("hard_fraction", \.hardFraction, 0...1, "H: from this fraction of train.steps after the spawn on, hard top-1 (1 = never)"),
            .double("threshold", \.threshold, 0...1, "gamma: an expert is selected when its Gumbel-softmax weight exceeds this"),
            .choice("weights", \.weights, "combine weights m*p (probability) or m*q (gumbel)"),
            .double("aux_loss", \.auxLoss, 0...100, "coefficient of EvoMoE's balance loss E * sum(me * ce)"),
            .double("activation_tau_max", \.activationTauMax, 1e-4...1e4, "activation_dts: starting temperature"),
            .double("activation_tau_min", \.activationTauMin, 1e-4...1e4, "activation_dts: final temperature"),
            .choice("activation", \.activation, "activation_dts: phi in softmax(phi(l + b) / tau)"),
        ]),
        ConfigSection("gates", \.gates, help: "Parameters of the hash, base, stablemoe, expert_choice and relu gates.", [
            .choice("hash_table", \.hashTable, "hash: uniform random table, or balanced by training-token frequency"),
            .double("base_epsilon", \.baseEpsilon, 0.0009765625...1, "base: the auction's bid step (the assignment's total score is within N * eps of optimal; scores are compared on a 1/1024 grid)"),
            .double("stable_stage2_fraction", \.stableStage2Fraction, 0...1, "stablemoe: stage 2 (frozen distilled routing) from this fraction of train.steps"),
            .int("stable_distill_dim", \.stableDistillDimension, min: 1, "stablemoe: width of the distilled router"),
            .double("stable_balance", \.stableBalance, 0...100, "stablemoe: balance loss coefficient (stage 1)"),
            .double("stable_distill", \.stableDistill, 0...100, "stablemoe: distillation loss coefficient (stage 1)"),
            .double("stable_capacity_factor", \.stableCapacityFactor, 0.01...1e6, "stablemoe: capacity ceil(CF * N / E); overflow skips the experts"),
            .double("expert_choice_capacity", \.expertChoiceCapacity, 0.01...1e6, "expert_choice: c, each expert takes ceil(N c / E) tokens"),
            .bool("allow_non_causal", \.allowNonCausal, "permit expert_choice in this causal language model (it leaks future tokens into routing)"),
            .double("relu_initial_lambda", \.reluInitialLambda, 0...1e6, "relu: starting L1 coefficient"),
            .double("relu_multiplier", \.reluMultiplier, 1...10, "relu: lambda is multiplied or divided by this after each update"),
            .double("relu_target_sparsity", \.reluTargetSparsity, 0...1, "relu: target fraction of zero routing weights; 0 = 1 - top_k / experts"),
        ]),
        ConfigSection("train", \.train, help: "Optimisation.", [
            .int("steps", \.steps, min: 0, "optimizer updates"),
            .int("batch_size", \.batchSize, min: 1, "sequences per rank per micro-batch; the global batch is ranks x grad_accum x batch_size"),
            .int("grad_accum", \.gradAccum, min: 1, "micro-batches per optimizer step, gradients summed (A); routing, capacity and aux losses work per micro-batch"),
            .int("attention_tile", \.attentionTile, min: 1, "sequences longer than this use tiled attention: T x T probabilities never stored, recomputed in backward (memory linear in T)"),
            .optionalInt("dispatch_chunks", \.dispatchChunks, min: 1, "MoE exchanges per direction: groups of local experts whose rows travel while the previous group's experts compute (at most the experts per rank; results are bitwise those of 1); auto = 1 when all ranks run on one host (shared memory, where the pipeline only costs), else 4 (fastest at 1 Gbit/s, docs/PERFORMANCE.md)"),
            .bool("overlap_all_reduce", \.overlapAllReduce, "all-reduce each block's replicated gradients (non-blocking) while backward goes on through the blocks below; false: one all-reduce after backward (shard_optimizer always uses the latter)"),
            .bool("shard_optimizer", \.shardOptimizer, "ZeRO stage 1: each rank keeps the AdamW moments of 1/R of the replicated parameters (gradients reduce-scattered, parameters all-gathered)"),
            .int("seed", \.seed, min: 0, "seed of initialisation, data order and routing noise"),
            .double("lr", \.learningRate, 0...10, "peak learning rate"),
            .double("min_lr", \.minLearningRate, 0...10, "learning rate at the end of the cosine decay"),
            .int("warmup_steps", \.warmupSteps, min: 0, "linear warm-up steps (a warm-up longer than the run never reaches the peak lr)"),
            .double("weight_decay", \.weightDecay, 0...10, "AdamW decoupled weight decay on matrices"),
            .double("beta1", \.beta1, 0...0.999999, "AdamW first-moment decay"),
            .double("beta2", \.beta2, 0...0.999999999, "AdamW second-moment decay"),
            .double("eps", \.epsilon, 1e-30...1, "AdamW epsilon"),
            .double("grad_clip", \.gradClip, 0...1e9, "clip the global gradient norm to this; 0 = off"),
            .bool("decay_embeddings", \.decayEmbeddings, "apply weight decay to the embeddings too"),
            .bool("decay_norms_and_biases", \.decayNormsAndBiases, "apply weight decay to norm gains and biases too"),
            .int("log_every", \.logEvery, min: 1, "write a metrics line every n steps"),
            .int("eval_every", \.evalEvery, min: 0, "evaluate on the validation data every n steps (0: only at the end)"),
            .int("eval_batches", \.evalBatches, min: 1, "validation batches per evaluation"),
            .int("consistency_check_every", \.consistencyCheckEvery, min: 0,
                 "every n steps, ranks compare a checksum of their replicated parameters and stop if they diverged (0: never)"),
            .int("max_consecutive_skips", \.maxConsecutiveSkips, min: 0,
                 "updates with a non-finite loss or gradient are skipped; stop after more than this many in a row"),
            .double("stall_seconds", \.stallSeconds, 1...1e7, "watchdog: an operation may last max(stall_seconds, stall_factor x median step time) before the job is aborted"),
            .double("stall_factor", \.stallFactor, 1...1e6, "watchdog: see stall_seconds"),
            .int("health_window", \.healthWindow, min: 1, "warn when an expert receives no tokens for this many steps, or one takes most of the load"),
            .choice("precision", \.precision,
                    "matrix products: fp32, bf16 (oneDNN: bf16 inputs, fp32 accumulation; master weights, optimizer state, norms, softmax and router stay fp32), auto = bf16 where it measures at least 1.15x fp32 on the model's shapes at start"),
            .choice("kernel", \.kernel,
                    "library of the fp32 products: openblas, onednn, auto = the faster on the model's shapes, measured at start (cached per machine)"),
        ]),
        ConfigSection("data", \.data, help: "Token files (llm.c format, see `moe prepare`). Relative paths are relative to the working directory.", [
            .paths("train", \.train, allowEmpty: false, "training token files: a file, a glob such as data/x/train_*.bin, or a list of them (shards)"),
            .paths("val", \.val, "validation token files, as train; empty for none"),
            .string("tokenizer", \.tokenizer, "tokenizer of the token files (tokenizer.json or llm.c's gpt2_tokenizer.bin), copied into every checkpoint; empty: tokenizer.json beside the first training file, if any"),
        ]),
        ConfigSection("checkpoint", \.checkpoint, help: "Checkpoints in RUN_DIR/checkpoints.", [
            .int("every", \.every, min: 0, "save every n steps (0: only at the end)"),
            .int("keep", \.keep, min: 1, "complete checkpoints to keep"),
            .bool("async", \.async, "write the periodic checkpoints in the background while training goes on (the state is snapshotted into memory kept for the whole run: about 12 bytes per parameter of a rank's share, mapped at start); the last one and one on a stop signal are written before the run ends"),
        ]),
    ]

    /// Loads `file` (or the embedded defaults when nil), applies `key=value` overrides, validates.
    public static func load(file: String?, overrides: [String] = []) throws -> RunConfig {
        var tree: [String: Any] = [:]
        if let file {
            if let problem = RegularFile.problem(file) { throw ConfigError.unreadable(file: file, reason: "\(problem)") }
            let text: String
            do { text = try String(contentsOfFile: file, encoding: .utf8) } catch {
                throw ConfigError.unreadable(file: file, reason: "not UTF-8 text")
            }
            tree = try parse(text, file: file)
        }
        var config = RunConfig()
        try config.apply(tree, overrides: overrides, file: file)
        return config
    }

    /// Applies `tree` (a parsed config file's mapping) and then `key=value` overrides to this
    /// config, and validates the result.
    public mutating func apply(_ tree: [String: Any] = [:], overrides: [String], file: String? = nil) throws {
        var tree = tree
        for override in overrides {
            guard let equals = override.firstIndex(of: "=") else { throw ConfigError.badOverride(override) }
            let key = String(override[..<equals]), valueText = String(override[override.index(after: equals)...])
            let parts = key.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { throw ConfigError.badOverride(override) }
            let value = (try? SafeYAML.load(valueText, file: "--set")).flatMap { $0 } ?? valueText
            var section = tree[parts[0]] as? [String: Any] ?? [:]
            section[parts[1]] = value
            tree[parts[0]] = section
        }
        try apply(tree, file: file)
        try validate()
    }

    static func parse(_ text: String, file: String) throws -> [String: Any] {
        guard let loaded = try SafeYAML.load(text, file: file) else { return [:] }
        guard let mapping = loaded as? [String: Any] else { throw ConfigError.notAMapping(file: file, key: "the document") }
        return mapping
    }

    mutating func apply(_ tree: [String: Any], file: String?) throws {
        for (name, value) in tree.sorted(by: { $0.key < $1.key }) {
            guard let section = RunConfig.sections.first(where: { $0.name == name }) else {
                throw ConfigError.unknownKey(key: name, known: RunConfig.sections.map(\.name), file: file)
            }
            if value is NSNull { continue }
            guard let entries = value as? [String: Any] else { throw ConfigError.notAMapping(file: file ?? "--set", key: name) }
            for (key, fieldValue) in entries.sorted(by: { $0.key < $1.key }) {
                guard let field = section.fields.first(where: { $0.key == key }) else {
                    throw ConfigError.unknownKey(key: "\(name).\(key)", known: section.keys.map { "\(name).\($0)" }, file: file)
                }
                try field.read(&self, fieldValue, "\(name).\(key)")
            }
        }
    }

    /// Cross-key rules that a single field cannot check.
    public func validate() throws {
        if model.width % model.heads != 0 {
            throw ConfigError.inconsistent("model.heads (\(model.heads)) must divide model.width (\(model.width))")
        }
        if let kvHeads = model.kvHeads, model.heads % kvHeads != 0 {
            throw ConfigError.inconsistent("model.kv_heads (\(kvHeads)) must divide model.heads (\(model.heads))")
        }
        if model.architecture == .gpt2 && (model.keyValueHeads != model.heads || model.queryKeyNorm != .none) {
            throw ConfigError.inconsistent("model.kv_heads and model.qk_norm need model.architecture: llama (the gpt2 block has neither)")
        }
        if model.architecture == .llama && (model.width / model.heads) % 2 != 0 {
            throw ConfigError.inconsistent("model.architecture llama rotates pairs of dimensions: the head size model.width / model.heads (\(model.width / model.heads)) must be even")
        }
        try validateRouting()
        if moe.topK > moe.experts {
            throw ConfigError.inconsistent("moe.top_k (\(moe.topK)) cannot exceed moe.experts (\(moe.experts))")
        }
        if moe.gate == .switch && moe.topK != 1 {
            throw ConfigError.inconsistent("moe.gate switch routes each token to one expert: set moe.top_k to 1 (got \(moe.topK))")
        }
        if moe.gate == .gshard && moe.topK != 2 {
            throw ConfigError.inconsistent("moe.gate gshard routes each token to two experts: set moe.top_k to 2 (got \(moe.topK))")
        }
        if moe.gate == .expertChoice && !gates.allowNonCausal {
            throw ConfigError.inconsistent("moe.gate expert_choice lets each expert pick its tokens from the whole batch, so a token's routing depends on later tokens: this leaks the future in a causal language model and cannot be reproduced when generating; set gates.allow_non_causal: true to use it anyway")
        }
        if dts.tauMin > dts.tauMax || dts.activationTauMin > dts.activationTauMax {
            throw ConfigError.inconsistent("dts: the minimum temperature exceeds the maximum")
        }
        if train.minLearningRate > train.learningRate {
            throw ConfigError.inconsistent("train.min_lr (\(train.minLearningRate)) exceeds train.lr (\(train.learningRate))")
        }
    }

    /// The routing keys of the topk gate: which gate may use them, and what fits together.
    func validateRouting() throws {
        let usesScoring = moe.score != .softmax || moe.routedScale != 1 || moe.biasUpdateRate > 0 || moe.sequenceBalanceLoss > 0
            || moe.expertGroups > 1 || moe.groupLimit > 0
        if usesScoring && moe.gate != .topk {
            throw ConfigError.inconsistent("moe.score, routed_scale, bias_update_rate, sequence_balance_loss, expert_groups and group_limit shape the topk gate's selection; moe.gate is \(moe.gate.rawValue)")
        }
        if moe.score == .sigmoid && (moe.balanceLoss > 0 || moe.zLoss > 0) {
            throw ConfigError.inconsistent("moe.score sigmoid has no softmax probabilities for moe.balance_loss or moe.z_loss: set them to 0 (balance with moe.bias_update_rate and moe.sequence_balance_loss)")
        }
        if moe.experts % moe.expertGroups != 0 {
            throw ConfigError.inconsistent("moe.expert_groups (\(moe.expertGroups)) must divide moe.experts (\(moe.experts))")
        }
        if moe.groupLimit > moe.expertGroups {
            throw ConfigError.inconsistent("moe.group_limit (\(moe.groupLimit)) cannot exceed moe.expert_groups (\(moe.expertGroups))")
        }
        if moe.groupLimit > 0 && moe.topK > moe.groupLimit * (moe.experts / moe.expertGroups) {
            throw ConfigError.inconsistent("moe.top_k (\(moe.topK)) exceeds the experts of moe.group_limit (\(moe.groupLimit)) groups of \(moe.experts / moe.expertGroups)")
        }
        if evomoe.spawnFraction > 0, let hidden = moe.expertHidden, hidden != model.ffnHidden {
            throw ConfigError.inconsistent("EvoMoE spawns the experts from a dense FFN of model.ffn_hidden (\(model.ffnHidden)): moe.expert_hidden (\(hidden)) must equal it, or set evomoe.spawn_fraction: 0")
        }
        if moe.sharedGate && moe.sharedExperts == 0 {
            throw ConfigError.inconsistent("moe.shared_gate scales the shared experts' output: set moe.shared_experts")
        }
    }

    /// The resolved configuration as YAML, every key present, each with its help as a comment.
    public func yaml(withHelp: Bool = true) -> String {
        var lines: [String] = []
        for section in RunConfig.sections {
            if withHelp { lines.append("# \(section.help)") }
            lines.append("\(section.name):")
            for field in section.fields {
                let value = field.write(self)
                lines.append(withHelp ? "  \(field.key): \(value)  # \(field.help)" : "  \(field.key): \(value)")
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Keys whose values differ between two configs, as dotted names.
    public func differingKeys(from other: RunConfig, sections names: Set<String>? = nil) -> [String] {
        RunConfig.sections.filter { names?.contains($0.name) ?? true }.flatMap { section in
            section.fields.filter { $0.write(self) != $0.write(other) }.map { "\(section.name).\($0.key)" }
        }
    }

    /// Parses a config previously written by `yaml()` (for checkpoints).
    public static func fromResolved(_ text: String, file: String) throws -> RunConfig {
        var config = RunConfig()
        try config.apply(try parse(text, file: file), file: file)
        return config
    }
}
