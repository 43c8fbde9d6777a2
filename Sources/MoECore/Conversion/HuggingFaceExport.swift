import Foundation
import MoEIO

/// `moe export --format hf`: a checkpoint as a Hugging Face model directory. The llama block
/// becomes one of transformers' own MoE classes (NativeExport.swift), loaded by
/// `AutoModelForCausalLM.from_pretrained(dir)`; the GPT-2 block, which no transformers class
/// represents, loads with `trust_remote_code=True`:
///   model.safetensors      the weights only (no optimizer state), every rank's experts merged
///   config.json            the architecture and the routing rule
///   modeling_swiftmoe.py   gpt2 only: the model in PyTorch (HuggingFaceModeling.swift), with
///                          SwiftMoE's tensor names and layouts (linear weights are [in, out])
///   tokenizer.json         the run's tokenizer, or a byte-level one for a byte model
///   tokenizer_config.json  so that AutoTokenizer loads it
/// The exported model routes dropless (no capacity), as `moe generate` does; `moe eval` matches
/// it when the checkpoint's eval_capacity_factor drops nothing (docs/ARCHITECTURE.md, "Export").
public enum HuggingFaceExport {
    public enum ExportError: Error, CustomStringConvertible {
        case unsupportedGate(GateKind)
        case missingTensor(checkpoint: String, name: String)
        case cannotWrite(path: String, reason: String)

        public var description: String {
            switch self {
            case let .unsupportedGate(gate):
                return "export: gate '\(gate.rawValue)' routes in a way the exported model does not implement; supported: topk, switch, gshard, dts (and EvoMoE's dense phase)"
            case let .missingTensor(checkpoint, name): return "export: checkpoint '\(checkpoint)' has no tensor '\(name)'"
            case let .cannotWrite(path, reason): return "export: cannot write '\(path)': \(reason)"
            }
        }
    }

    /// How an MoE layer of the exported model routes at inference: the `k` most likely experts
    /// under softmax(x W), weighted by their probabilities, renormalised over the k or not.
    struct RoutingRule {
        var k: Int
        var renormalize: Bool

        /// Each gate's evaluation-time rule without capacity (docs/ALGORITHMS.md): top-k as
        /// configured; Switch the plain probability; GShard's two renormalised (its sampled
        /// second choice is training only); DTS top-1 with weight p.
        init(_ moe: MoEConfig) throws {
            switch moe.gate {
            case .topk: (k, renormalize) = (moe.topK, moe.renormalize != .none)
            case .switch: (k, renormalize) = (moe.topK, false)
            case .gshard: (k, renormalize) = (2, true)
            case .dts: (k, renormalize) = (1, false)
            default: throw ExportError.unsupportedGate(moe.gate)
            }
        }
    }

    public struct Summary: CustomStringConvertible {
        public var tensors: Int
        public var parameters: Int
        public var bytes: Int
        public var files: [String]
        public var modelClass: String
        public var description: String {
            "\(modelClass): \(tensors) tensors, \(parameters) parameters, \(bytes) bytes of weights; files: \(files.joined(separator: ", "))"
        }
    }

    public static func export(checkpoint directory: String, manifest: CheckpointManifest, to output: String,
                              dataType: Safetensors.DataType) throws -> Summary {
        let config = try Checkpoint.config(of: manifest, directory: directory)
        let densePhase = manifest.phase == .dense
        let rule = densePhase ? nil : try RoutingRule(config.moe)
        let moeLayers = densePhase ? [] : (0..<config.model.layers).filter { GPTModel<Float>.isMoE(layer: $0, every: config.model.moeEvery) }
        let (values, tensors) = try modelWeights(of: directory, manifest: manifest, config: config, densePhase: densePhase)
        func read(_ name: String) throws -> TensorLocation {
            guard let tensor = tensors[name] else { throw ExportError.missingTensor(checkpoint: directory, name: name) }
            return tensor
        }
        let native = config.model.architecture == .llama ? try NativeClass.choose(config, rule: rule) : nil
        let layout = try native.map {
            try exportedTensors(nativeLayout(config, target: $0, moeLayers: Set(moeLayers)), values: values, read: read)
        } ?? ExportedTensors(values: values, entries: tensors.map { ($0.key, $0.value.shape, $0.value.offset..<$0.value.offset + $0.value.count) })
        do {
            try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
            let data = try layout.encode(dataType: dataType)
            try write(data, output, "model.safetensors")
            var files = ["model.safetensors", "config.json"]
            if let native {
                try write(Data(nativeConfigJSON(config, target: native, vocabularySize: manifest.vocabularySize, moeLayers: moeLayers,
                                                rule: rule, dataType: dataType).utf8), output, "config.json")
            } else {
                try write(Data(configJSON(config, vocabularySize: manifest.vocabularySize, moeLayers: moeLayers,
                                          rule: rule, dataType: dataType).utf8), output, "config.json")
                try write(Data(HuggingFaceModeling.source.utf8), output, "modeling_swiftmoe.py")
                files.append("modeling_swiftmoe.py")
            }
            files += try writeTokenizer(of: directory, manifest: manifest, context: config.model.context, to: output)
            return Summary(tensors: layout.entries.count, parameters: tensors.values.reduce(0) { $0 + $1.count }, bytes: data.count, files: files,
                           modelClass: native?.architecture ?? "SwiftMoEForCausalLM (remote code)")
        } catch let error as ExportError {
            throw error
        } catch {
            throw ExportError.cannotWrite(path: output, reason: "\(error)")
        }
    }

    /// The model's weights: every MoE position's router and experts, or in EvoMoE's dense phase
    /// its dense FFN renamed as a block's `ffn`.
    static func modelWeights(of directory: String, manifest: CheckpointManifest, config: RunConfig,
                             densePhase: Bool) throws -> (values: [Float], tensors: [String: TensorLocation]) {
        let (values, found) = try weights(of: directory, manifest: manifest)
        var tensors = found
        for layer in (0..<config.model.layers) where GPTModel<Float>.isMoE(layer: layer, every: config.model.moeEvery) {
            let prefix = "blocks.\(layer).moe."
            for name in tensors.keys where name.hasPrefix(prefix) {
                let value = tensors.removeValue(forKey: name)!
                if densePhase, name.hasPrefix(prefix + "dense.") {
                    tensors["blocks.\(layer).ffn." + name.dropFirst((prefix + "dense.").count)] = value
                } else if !densePhase, !name.hasPrefix(prefix + "dense.") {
                    tensors[name] = value
                }
            }
            let required = densePhase ? ["blocks.\(layer).ffn.up.weight"]
                : ["\(prefix)router"] + (0..<config.moe.experts).map { "\(prefix)experts.\($0).down.weight" }
            for name in required where tensors[name] == nil { throw ExportError.missingTensor(checkpoint: directory, name: name) }
        }
        return (values, tensors)
    }

    /// The run's tokenizer (or a byte-level one for a byte model) and its config; the files written.
    static func writeTokenizer(of directory: String, manifest: CheckpointManifest, context: Int, to output: String) throws -> [String] {
        var files: [String] = []
        if let tokenizer = try Checkpoint.tokenizer(directory, manifest: manifest) {
            try write(tokenizer.contents, output, tokenizer.checkpointName)
            files.append(tokenizer.checkpointName)
        } else if manifest.vocabularySize == 256 {
            // Bytes: a byte-level BPE without merges is exactly one token per byte.
            try write(Data(try BytePairEncoding(tokenBytes: (0..<256).map { [UInt8($0)] }, merges: []).json().utf8), output, Tokenizers.fileName)
            files.append(Tokenizers.fileName)
        }
        if files.contains(Tokenizers.fileName) {
            try write(Data(#"{"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": \#(context)}"#.utf8 + [10]),
                      output, "tokenizer_config.json")
            files.append("tokenizer_config.json")
        }
        return files
    }

    typealias TensorLocation = (shape: [Int], offset: Int, count: Int)

    /// Every parameter of the checkpoint (no optimizer moments), one after another in `values`;
    /// an expert saved by several ranks (replicas) is taken once.
    static func weights(of directory: String, manifest: CheckpointManifest) throws -> (values: [Float], tensors: [String: TensorLocation]) {
        var files = [try Checkpoint.verifiedFile(Checkpoint.replicatedFile, in: directory, manifest: manifest)]
        for case let name? in manifest.expertFiles { files.append(try Checkpoint.verifiedFile(name, in: directory, manifest: manifest)) }
        var tensors: [String: TensorLocation] = [:], total = 0
        for file in files {
            for (name, info) in file.tensors where !name.hasPrefix("optimizer.") && tensors[name] == nil {
                let count = info.shape.reduce(1, *)
                tensors[name] = (info.shape, total, count)
                total += count
            }
        }
        var values = [Float](repeating: 0, count: total)
        try values.withUnsafeMutableBufferPointer { all in
            for file in files {
                for (name, info) in file.tensors where !name.hasPrefix("optimizer.") {
                    try file.read(name, shape: info.shape, into: all.baseAddress! + tensors[name]!.offset)
                }
            }
        }
        return (values, tensors)
    }

    static func write(_ data: Data, _ directory: String, _ name: String) throws {
        try data.write(to: URL(fileURLWithPath: (directory as NSString).appendingPathComponent(name)), options: .atomic)
    }

    static func configJSON(_ config: RunConfig, vocabularySize: Int, moeLayers: [Int], rule: RoutingRule?, dataType: Safetensors.DataType) throws -> String {
        let model = config.model
        let object: [String: Any] = [
            "architectures": ["SwiftMoEForCausalLM"],
            "model_type": "swiftmoe",
            "auto_map": ["AutoConfig": "modeling_swiftmoe.SwiftMoEConfig", "AutoModelForCausalLM": "modeling_swiftmoe.SwiftMoEForCausalLM"],
            "vocab_size": vocabularySize, "context": model.context, "width": model.width, "layers": model.layers,
            "heads": model.heads, "ffn_hidden": model.ffnHidden, "tie_embeddings": model.tieEmbeddings,
            "moe_layers": moeLayers, "experts": config.moe.experts, "experts_per_token": rule?.k ?? 1,
            "renormalize": rule?.renormalize ?? false, "layer_norm_epsilon": 1e-5,
            "torch_dtype": dataType == .f32 ? "float32" : "bfloat16",
            "swiftmoe_gate": config.moe.gate.rawValue,
        ]
        return String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self) + "\n"
    }
}
