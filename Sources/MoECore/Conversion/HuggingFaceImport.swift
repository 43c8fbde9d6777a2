import Foundation
import MoEComm
import MoEIO

/// `moe import`: a transformers model directory (config.json and model.safetensors, or shards
/// listed in model.safetensors.index.json; F32, BF16 or F16) as a SwiftMoE llama model. The MoE
/// classes that `moe export` writes come back (Mixtral, Qwen3-MoE, OLMoE), and the dense Llama,
/// Mistral and Qwen3 models that `moe upcycle` turns into MoEs. Tensor names and layouts are
/// NativeExport.swift's mapping, read the other way; every tensor of the directory must find its
/// place, and every parameter of the model must be written, or the import stops naming the first
/// that did not. The imported model routes as transformers does: softmax top-k, dropless.
public enum HuggingFaceImport {
    public enum ImportError: Error, CustomStringConvertible {
        case unreadable(path: String, reason: String)
        case unsupported(path: String, what: String)
        case tensor(path: String, name: String, reason: String)

        public var description: String {
            switch self {
            case let .unreadable(path, reason): return "import: cannot read '\(path)': \(reason)"
            case let .unsupported(path, what): return "import: '\(path)': \(what)"
            case let .tensor(path, name, reason): return "import: '\(path)': tensor '\(name)' \(reason)"
            }
        }
    }

    /// A transformers model directory, read: the SwiftMoE config of its model and the class
    /// whose tensor names it uses.
    public struct Source {
        public let directory: String
        public let config: RunConfig
        public let modelType: String
        let target: NativeClass
        /// Whether its blocks have experts (a dense model is upcycled or trained dense).
        public var isMoE: Bool { config.model.moeEvery > 0 }
    }

    /// The model types read, and the class naming their tensors (dense ones: only its `mlp`).
    static let modelTypes: [String: NativeClass] = [
        "mixtral": .mixtral, "qwen2_moe": .qwen2Moe, "qwen3_moe": .qwen3Moe, "olmoe": .olmoe, "llama": .mixtral, "mistral": .mixtral,
        "qwen3": .qwen3Moe,
    ]

    /// Reads `directory/config.json`; `overrides` (`key=value`, as `--set`) adjust the result,
    /// such as a shorter `model.context` or a training capacity factor.
    public static func source(_ directory: String, overrides: [String] = []) throws -> Source {
        let path = (directory as NSString).appendingPathComponent("config.json")
        if let problem = RegularFile.problem(path) { throw ImportError.unreadable(path: path, reason: "\(problem)") }
        guard let data = FileManager.default.contents(atPath: path),
              let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw ImportError.unreadable(path: path, reason: "not a JSON object")
        }
        let modelType = json["model_type"] as? String ?? "(none)"
        guard let target = modelTypes[modelType] else {
            throw ImportError.unsupported(path: path, what: "model_type '\(modelType)': SwiftMoE imports \(modelTypes.keys.sorted().joined(separator: ", "))")
        }
        var config = try runConfig(json, modelType: modelType, path: path)
        do { try config.apply(overrides: overrides) } catch { throw ImportError.unsupported(path: path, what: "\(error)") }
        return Source(directory: directory, config: config, modelType: modelType, target: target)
    }

    /// The SwiftMoE config of a transformers config.json (llama block, softmax top-k routing
    /// without capacity, no EvoMoE phase).
    static func runConfig(_ json: [String: Any], modelType: String, path: String) throws -> RunConfig {
        let fields = ConfigJSON(json: json, path: path)
        var run = RunConfig(), model = ModelConfig()
        model.architecture = .llama
        model.vocabularySize = try fields.int("vocab_size")
        model.width = try fields.int("hidden_size")
        model.layers = try fields.int("num_hidden_layers")
        model.heads = try fields.int("num_attention_heads")
        model.kvHeads = try fields.optionalInt("num_key_value_heads")
        if let headSize = try fields.optionalInt("head_dim"), headSize * model.heads != model.width {
            throw ImportError.unsupported(path: path, what: "head_dim \(headSize) is not hidden_size / num_attention_heads (SwiftMoE's heads split the width)")
        }
        // The rotary table and the training windows: a long model context is cut to 4096 (raise it with --set model.context).
        model.context = min(try fields.int("max_position_embeddings"), 4096)
        model.normEpsilon = try fields.optionalDouble("rms_norm_eps") ?? 1e-6
        model.tieEmbeddings = json["tie_word_embeddings"] as? Bool ?? false
        model.ropeTheta = try fields.ropeTheta()
        try fields.refuseUnsupportedFeatures()
        run.moe.gate = .topk
        (run.moe.capacityFactor, run.moe.evalCapacityFactor, run.moe.jitter, run.moe.zLoss) = (nil, nil, 0, 0)
        run.evomoe.spawnFraction = 0
        switch modelType {
        case "mixtral":
            (model.moeEvery, model.ffnHidden, model.queryKeyNorm) = (1, try fields.int("intermediate_size"), .none)
            (run.moe.experts, run.moe.renormalize) = (try fields.experts(), .beforeDrop)
        case "qwen2_moe", "qwen3_moe":
            run.moe.expertHidden = try fields.int("moe_intermediate_size")
            model.ffnHidden = try fields.optionalInt("intermediate_size") ?? run.moe.expertHidden!
            run.moe.experts = try fields.experts()
            model.moeEvery = try sparseEvery(fields, layers: model.layers, experts: run.moe.experts)
            model.queryKeyNorm = modelType == "qwen3_moe" ? .head : .none
            run.moe.renormalize = json["norm_topk_prob"] as? Bool == true ? .beforeDrop : .none
            if modelType == "qwen2_moe" {
                if json["qkv_bias"] as? Bool ?? true { throw ImportError.unsupported(path: path, what: "qkv_bias (attention biases) is not supported by SwiftMoE's llama block") }
                (run.moe.sharedExperts, run.moe.sharedHidden, run.moe.sharedGate) = (1, try fields.int("shared_expert_intermediate_size"), true)
            }
        case "olmoe":
            (model.moeEvery, model.ffnHidden, model.queryKeyNorm) = (1, try fields.int("intermediate_size"), .full)
            run.moe.experts = try fields.experts()
            run.moe.renormalize = json["norm_topk_prob"] as? Bool == true ? .beforeDrop : .none
        default:   // dense: llama, mistral, qwen3
            (model.moeEvery, model.ffnHidden, model.queryKeyNorm) = (0, try fields.int("intermediate_size"), modelType == "qwen3" ? .head : .none)
            (run.moe.experts, run.moe.topK) = (1, 1)
        }
        if model.moeEvery == 0 { (run.moe.experts, run.moe.topK) = (1, 1) }   // no experts (a dense Qwen-MoE)
        if model.moeEvery > 0 {
            run.moe.topK = try fields.int("num_experts_per_tok")
            run.moe.balanceLoss = try fields.optionalDouble("router_aux_loss_coef") ?? 0.01
        }
        run.model = model
        return run
    }

    /// Qwen-MoE's sparse blocks as `model.moe_every`: block l has experts when num_experts > 0,
    /// (l + 1) % decoder_sparse_step == 0 and l is not in mlp_only_layers (what `moe export`
    /// writes, EvoMoE's dense phase as no experts); a pattern no `moe_every` gives is refused.
    static func sparseEvery(_ fields: ConfigJSON, layers: Int, experts: Int) throws -> Int {
        let step = try fields.optionalInt("decoder_sparse_step") ?? 1
        let denseOnly = Set((fields.json["mlp_only_layers"] as? [Int]) ?? [])
        let sparse = (0..<layers).filter { experts > 0 && step > 0 && ($0 + 1) % step == 0 && !denseOnly.contains($0) }
        let every = sparse.isEmpty ? 0 : step
        guard sparse == (0..<layers).filter({ GPTModel<Float>.isMoE(layer: $0, every: every) }) else {
            throw ImportError.unsupported(path: fields.path, what: "mlp_only_layers \(denseOnly.sorted()) with decoder_sparse_step \(step): SwiftMoE has an MoE in every n-th block, not this pattern")
        }
        return every
    }

    /// Tensor name -> the safetensors file holding it (one file, or the index's shards).
    static func tensorFiles(_ directory: String) throws -> [String: Safetensors.File] {
        let types: Set<String> = ["F32", "BF16", "F16"]
        func path(_ name: String) -> String { (directory as NSString).appendingPathComponent(name) }
        let index = path("model.safetensors.index.json")
        guard FileManager.default.fileExists(atPath: index) else {
            let file = try Safetensors.File(path: path("model.safetensors"), dataTypes: types)
            return file.tensors.keys.reduce(into: [:]) { $0[$1] = file }
        }
        guard let data = FileManager.default.contents(atPath: index),
              let map = ((try? JSONSerialization.jsonObject(with: data)) as? [String: Any])?["weight_map"] as? [String: String] else {
            throw ImportError.unreadable(path: index, reason: "no weight_map of tensor names to files")
        }
        var files: [String: Safetensors.File] = [:], byTensor: [String: Safetensors.File] = [:]
        for (tensor, name) in map {
            guard !name.contains("/") else { throw ImportError.unreadable(path: index, reason: "shard '\(name)' is outside the directory") }
            if files[name] == nil { files[name] = try Safetensors.File(path: path(name), dataTypes: types) }
            guard files[name]!.tensors[tensor] != nil else { throw ImportError.tensor(path: path(name), name: tensor, reason: "is listed in the index but not in the shard") }
            byTensor[tensor] = files[name]
        }
        return byTensor
    }

    /// Writes every parameter of `model` (built from `source.config` on one rank) from the
    /// directory's tensors.
    public static func load(_ source: Source, into model: GPTModel<Float>) throws {
        let files = try tensorFiles(source.directory)
        let moeLayers = Set((0..<source.config.model.layers).filter { GPTModel<Float>.isMoE(layer: $0, every: source.config.model.moeEvery) })
        var parameters: [String: (values: UnsafeMutablePointer<Float>, rows: Int, columns: Int)] = [:]
        for entry in model.replicated.entries { parameters[entry.name] = (model.replicated.values + entry.offset, entry.rows, entry.columns) }
        for entry in model.experts.entries { parameters[entry.name] = (model.experts.values + entry.offset, entry.rows, entry.columns) }
        var used = Set<String>(), written = Set<String>()
        for mapping in HuggingFaceExport.nativeLayout(source.config, target: source.target, moeLayers: moeLayers) {
            guard let file = files[mapping.native], let info = file.tensors[mapping.native] else {
                throw ImportError.tensor(path: source.directory, name: mapping.native, reason: "is missing (the config describes a model that has it)")
            }
            let destination = parameters[mapping.source]!
            let expected = mapping.nativeShape(rows: destination.rows, columns: destination.columns)
            guard info.shape == expected else {
                throw ImportError.tensor(path: file.path, name: mapping.native, reason: "has shape \(info.shape), the config's model needs \(expected)")
            }
            var values = [Float](repeating: 0, count: expected.reduce(1, *))
            try file.read(mapping.native, shape: info.shape, into: &values)
            guard values.allSatisfy(\.isFinite) else { throw ImportError.tensor(path: file.path, name: mapping.native, reason: "holds a NaN or an infinity") }
            mapping.import(values, into: destination.values, rows: destination.rows, columns: destination.columns)
            used.insert(mapping.native)
            written.insert(mapping.source)
        }
        // Buffers older checkpoints saved (the rotary frequencies) are recomputed, not read.
        if let unused = files.keys.filter({ !used.contains($0) && !$0.hasSuffix("rotary_emb.inv_freq") }).sorted().first {
            throw ImportError.tensor(path: files[unused]!.path, name: unused, reason: "has no place in SwiftMoE's \(source.modelType) model (biases and other extras are not supported)")
        }
        if let missed = parameters.keys.filter({ !written.contains($0) }).sorted().first {
            throw ImportError.unsupported(path: source.directory, what: "the model's parameter '\(missed)' has no tensor in the directory")
        }
        model.replicated.didWriteAllValues()
        model.experts.didWriteAllValues()
    }
}

extension HuggingFaceImport {
    /// `moe import`: the model of transformers directory `directory` as step 0 of `runDirectory`.
    /// Returns the checkpoint directory, the config and notes for the user (the tokenizer's fate).
    public static func importModel(from directory: String, to runDirectory: String,
                                   overrides: [String]) throws -> (checkpoint: String, config: RunConfig, notes: [String]) {
        let source = try self.source(directory, overrides: overrides)
        let model = try GPTModel<Float>(source.config, vocabularySize: source.config.model.vocabularySize, communicator: SingleRankCommunicator())
        model.initializeParameters(seed: source.config.train.seed)
        try load(source, into: model)
        let (tokenizer, notes) = self.tokenizer(of: directory)
        return (try StartingCheckpoint.save(model, runDirectory: runDirectory, tokenizer: tokenizer), source.config, notes)
    }

    /// The directory's tokenizer.json where SwiftMoE runs it (byte-level BPE), else a note on
    /// what to do instead.
    public static func tokenizer(of directory: String) -> (TokenizerFile?, [String]) {
        let path = (directory as NSString).appendingPathComponent(Tokenizers.fileName)
        let advice = "tokenize training text with the model's own tokenizer into llm.c token files (docs/DATA.md) and train with data.train pointing at them"
        guard let contents = FileManager.default.contents(atPath: path) else {
            return (nil, ["no \(Tokenizers.fileName) in '\(directory)': the checkpoint carries no tokenizer; \(advice)"])
        }
        do {
            return (TokenizerFile(path: path, contents: contents, tokenizer: try Tokenizers.load(contents, path: path)), [])
        } catch {
            return (nil, ["tokenizer not carried over: \(error); SwiftMoE runs byte-level BPE tokenizers only, so \(advice)"])
        }
    }
}

/// A model saved as the first checkpoint of a new run (an import or an upcycling): step 0, fresh
/// optimizer state, its own config (also written as the run's config.yaml). `moe train --run-dir
/// DIR --resume [--set ...]` continues it on any number of ranks, with the schedule and data set
/// then (the architecture comes from the checkpoint).
public enum StartingCheckpoint {
    public enum StartError: Error, CustomStringConvertible {
        case notEmpty(String)
        public var description: String {
            switch self { case let .notEmpty(path): return "run directory '\(path)' already holds checkpoints; choose a new --output" }
        }
    }

    public static func save(_ model: GPTModel<Float>, runDirectory: String, tokenizer: TokenizerFile?) throws -> String {
        guard Checkpoint.complete(in: runDirectory).isEmpty else { throw StartError.notEmpty(runDirectory) }
        // The run's config, which `moe train --resume` without --config continues.
        try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
        try model.run.yaml().write(toFile: (runDirectory as NSString).appendingPathComponent("config.yaml"), atomically: true, encoding: .utf8)
        let train = model.run.train
        let settings = AdamWSettings(beta1: train.beta1, beta2: train.beta2, epsilon: train.epsilon, weightDecay: train.weightDecay)
        let contents = CheckpointContents(model: model, replicatedOptimizer: AdamW(store: model.replicated, settings: settings),
                                          expertOptimizer: AdamW(store: model.experts, settings: settings), state: TrainingState(),
                                          config: model.run, withAllReplicatedValues: { try $0() })
        return try Checkpoint.save(contents, communicator: SingleRankCommunicator(), runDirectory: runDirectory,
                                   attachments: tokenizer?.checkpointAttachment ?? [:])
    }
}

/// Typed reads of a transformers config.json, each failure naming the key.
struct ConfigJSON {
    let json: [String: Any]
    let path: String

    func optionalInt(_ key: String) throws -> Int? {
        guard let value = json[key], !(value is NSNull) else { return nil }
        guard let number = value as? Int, number >= 0 else { throw HuggingFaceImport.ImportError.unsupported(path: path, what: "'\(key)' is not a non-negative integer") }
        return number
    }

    func int(_ key: String) throws -> Int {
        guard let number = try optionalInt(key) else { throw HuggingFaceImport.ImportError.unsupported(path: path, what: "no '\(key)'") }
        return number
    }

    func optionalDouble(_ key: String) throws -> Double? {
        guard let value = json[key], !(value is NSNull) else { return nil }
        guard let number = (value as? NSNumber)?.doubleValue, number.isFinite else { throw HuggingFaceImport.ImportError.unsupported(path: path, what: "'\(key)' is not a number") }
        return number
    }

    /// Experts per layer: num_experts (Qwen, OLMoE) or num_local_experts (Mixtral; transformers 5 writes it for all).
    func experts() throws -> Int {
        try optionalInt("num_experts") ?? optionalInt("num_local_experts") ?? int("num_experts")
    }

    /// rope_theta, at the top level or in rope_parameters (transformers 5); scaled variants refused.
    func ropeTheta() throws -> Double {
        let parameters = (json["rope_parameters"] as? [String: Any]) ?? (json["rope_scaling"] as? [String: Any]) ?? [:]
        if let kind = (parameters["rope_type"] ?? parameters["type"]) as? String, kind != "default" {
            throw HuggingFaceImport.ImportError.unsupported(path: path, what: "rope_type '\(kind)' (scaled rotary embeddings) is not supported; SwiftMoE rotates by rope_theta alone")
        }
        return try optionalDouble("rope_theta") ?? (parameters["rope_theta"] as? NSNumber)?.doubleValue ?? 10_000
    }

    /// What the llama block does not have: biases, another activation, sliding windows, clipping.
    func refuseUnsupportedFeatures() throws {
        func refuse(_ what: String) -> HuggingFaceImport.ImportError { .unsupported(path: path, what: "\(what) is not supported by SwiftMoE's llama block") }
        if json["attention_bias"] as? Bool == true || json["mlp_bias"] as? Bool == true { throw refuse("attention_bias / mlp_bias (biases)") }
        if let activation = json["hidden_act"] as? String, activation != "silu" { throw refuse("hidden_act '\(activation)'") }
        if json["sliding_window"] as? Int != nil, json["use_sliding_window"] as? Bool != false { throw refuse("sliding_window attention") }
        if json["clip_qkv"] != nil, !(json["clip_qkv"] is NSNull) { throw refuse("clip_qkv") }
    }
}
