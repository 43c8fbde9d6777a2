import Foundation
import MoEIO

/// The llama block exported as one of transformers' own MoE classes, which
/// `AutoModelForCausalLM.from_pretrained(dir)` loads without remote code (and which vLLM,
/// llama.cpp's converters and PEFT know). Which class depends on what the model has:
///
///   | class      | query/key norm | MoE layers              | routing rule                       | shared expert |
///   |------------|----------------|-------------------------|------------------------------------|---------------|
///   | mixtral    | none           | every block             | softmax top-k, renormalised        | none          |
///   | qwen2_moe  | none           | every n-th (dense rest) | softmax top-k, renormalised or not | one, gated    |
///   | qwen3_moe  | head           | every n-th (dense rest) | softmax top-k, renormalised or not | none          |
///   | olmoe      | full           | every block             | softmax top-k, renormalised or not | none          |
///
/// A configuration none of them represents is a one-line error naming what is missing.
/// Weights: SwiftMoE's linear weights are [in, out], transformers' [out, in]; the fused
/// projections are split (QKV into q/k/v, SwiGLU's [C, 2H] into gate and up).
public enum NativeClass: String, CaseIterable, Sendable {
    case mixtral
    case qwen2Moe = "qwen2_moe"
    case qwen3Moe = "qwen3_moe"
    case olmoe

    /// transformers' model class and the prefix of an MoE layer's modules.
    var architecture: String {
        ["mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"][rawValue]!
    }
    var moePrefix: String { self == .mixtral ? "block_sparse_moe" : "mlp" }
    var expertNames: (gate: String, up: String, down: String) {
        self == .mixtral ? ("w1", "w3", "w2") : ("gate_proj", "up_proj", "down_proj")
    }

    /// The class that represents `config`'s model (routing by `rule`; nil: EvoMoE's dense phase).
    static func choose(_ config: RunConfig, rule: HuggingFaceExport.RoutingRule?) throws -> NativeClass {
        let model = config.model, moe = config.moe
        let everyBlock = rule != nil && model.moeEvery == 1
        let dense = rule == nil ? "EvoMoE's dense phase (dense FFNs until the spawn)" : "dense blocks (model.moe_every \(model.moeEvery))"
        if moe.score != .softmax || moe.routedScale != 1 || moe.biasUpdateRate > 0 || moe.groupLimit > 0 {
            throw NativeExportError.unrepresentable("sigmoid scores, a routed scale, loss-free balancing's bias or group-limited routing: the transformers class that routes so (DeepSeek-V3) has multi-head latent attention, which SwiftMoE does not")
        }
        if moe.sharedExperts > 0 {
            guard moe.sharedGate, model.queryKeyNorm == .none else {
                throw NativeExportError.unrepresentable("shared experts need moe.shared_gate: true and model.qk_norm: none to be Qwen2-MoE's gated shared expert")
            }
            return .qwen2Moe
        }
        switch model.queryKeyNorm {
        case .head:
            return .qwen3Moe
        case .none:
            guard everyBlock else { throw NativeExportError.unrepresentable("\(dense) without query/key norms: Mixtral has an MoE in every block and Qwen3-MoE needs model.qk_norm: head") }
            guard rule!.renormalize else { throw NativeExportError.unrepresentable("top-k weights that are not renormalised (gate \(config.moe.gate.rawValue)) without query/key norms: Mixtral always renormalises; Qwen3-MoE (model.qk_norm: head) and OLMoE (full) can do both") }
            return .mixtral
        case .full:
            guard everyBlock else { throw NativeExportError.unrepresentable("\(dense) with model.qk_norm full: OLMoE has an MoE in every block") }
            return .olmoe
        }
    }
}

public enum NativeExportError: Error, CustomStringConvertible {
    case unrepresentable(String)
    public var description: String {
        switch self { case let .unrepresentable(what): return "export: no transformers class represents this llama model: \(what)" }
    }
}

/// Where one tensor of a transformers checkpoint lives in SwiftMoE's parameters: `source`'s
/// columns `columns` (all when nil), transposed ([in, out] against transformers' [out, in]) for
/// a linear weight. Export reads these views, import writes them: both directions are here.
struct TensorMapping {
    var native: String
    var source: String
    var columns: Range<Int>?
    var transposed: Bool

    /// The transformers tensor's shape, for a source of [rows, columns] (a vector when rows = 1).
    func nativeShape(rows: Int, columns: Int) -> [Int] {
        transposed ? [(self.columns ?? 0..<columns).count, rows] : (rows == 1 ? [columns] : [rows, columns])
    }

    /// Appends the transformers tensor, read from the source's values [rows, columns].
    func export(_ source: UnsafePointer<Float>, rows: Int, columns: Int, to output: inout [Float]) {
        guard transposed else { return output.append(contentsOf: UnsafeBufferPointer(start: source, count: rows * columns)) }
        for column in self.columns ?? 0..<columns {
            for r in 0..<rows { output.append(source[r * columns + column]) }
        }
    }

    /// Writes the transformers tensor `values` into the source's values [rows, columns].
    func `import`(_ values: [Float], into destination: UnsafeMutablePointer<Float>, rows: Int, columns: Int) {
        guard transposed else { return destination.update(from: values, count: values.count) }
        for (o, column) in (self.columns ?? 0..<columns).enumerated() {
            for r in 0..<rows { destination[r * columns + column] = values[o * rows + r] }
        }
    }
}

extension HuggingFaceExport {
    /// The tensors of an export over one buffer of values: the checkpoint's own (remote-code
    /// export, no copy), or the native layout built from it.
    struct ExportedTensors {
        var values: [Float] = []
        var entries: [(name: String, shape: [Int], range: Range<Int>)] = []

        /// One safetensors file, the tensors in name order.
        func encode(dataType: Safetensors.DataType) throws -> Data {
            try values.withUnsafeBufferPointer { all in
                try Safetensors.encode(entries.sorted { $0.name < $1.name }.map {
                    Safetensors.Entry(name: $0.name, shape: $0.shape, values: UnsafeBufferPointer(rebasing: all[$0.range]))
                }, metadata: ["format": "pt", "producer": "swiftmoe"], dataType: dataType)
            }
        }
    }

    /// The tensors of `target` (names in transformers' checkpoint) and where each lives in
    /// `config`'s model. `moeLayers`: the blocks whose feed-forward is routed (the others read a
    /// dense `blocks.L.ffn`, EvoMoE's dense phase included).
    static func nativeLayout(_ config: RunConfig, target: NativeClass, moeLayers: Set<Int>) -> [TensorMapping] {
        let model = config.model, width = model.width, headSize = width / model.heads, keyWidth = model.keyValueHeads * headSize
        let moe = config.moe, expertHidden = moe.expertHidden ?? model.ffnHidden
        var layout: [TensorMapping] = []
        func linear(_ native: String, _ source: String, _ columns: Range<Int>? = nil) {
            layout.append(TensorMapping(native: native, source: source, columns: columns, transposed: true))
        }
        func plain(_ native: String, _ source: String) { layout.append(TensorMapping(native: native, source: source, columns: nil, transposed: false)) }
        /// SwiGLU's [C, 2H] up weight and [H, C] down weight as gate, up and down projections.
        func feedForward(_ prefix: String, _ source: String, _ names: (gate: String, up: String, down: String), hidden: Int) {
            linear("\(prefix).\(names.gate).weight", "\(source).up.weight", 0..<hidden)
            linear("\(prefix).\(names.up).weight", "\(source).up.weight", hidden..<2 * hidden)
            linear("\(prefix).\(names.down).weight", "\(source).down.weight")
        }
        plain("model.embed_tokens.weight", "embedding.token")
        if !model.tieEmbeddings { linear("lm_head.weight", "head.weight") }
        plain("model.norm.weight", "final_norm.gain")
        for layer in 0..<model.layers {
            let to = "model.layers.\(layer)", from = "blocks.\(layer)"
            plain("\(to).input_layernorm.weight", "\(from).attention_norm.gain")
            plain("\(to).post_attention_layernorm.weight", "\(from).ffn_norm.gain")
            let qkv = "\(from).attention.qkv.weight"
            linear("\(to).self_attn.q_proj.weight", qkv, 0..<width)
            linear("\(to).self_attn.k_proj.weight", qkv, width..<width + keyWidth)
            linear("\(to).self_attn.v_proj.weight", qkv, width + keyWidth..<width + 2 * keyWidth)
            linear("\(to).self_attn.o_proj.weight", "\(from).attention.projection.weight")
            if model.queryKeyNorm != .none {
                plain("\(to).self_attn.q_norm.weight", "\(from).attention.query_norm.gain")
                plain("\(to).self_attn.k_norm.weight", "\(from).attention.key_norm.gain")
            }
            guard moeLayers.contains(layer) else {
                feedForward("\(to).mlp", "\(from).ffn", ("gate_proj", "up_proj", "down_proj"), hidden: model.ffnHidden)
                continue
            }
            let prefix = "\(to).\(target.moePrefix)"
            linear("\(prefix).gate.weight", "\(from).moe.router")
            for expert in 0..<moe.experts {
                feedForward("\(prefix).experts.\(expert)", "\(from).moe.experts.\(expert)", target.expertNames, hidden: expertHidden)
            }
            if moe.sharedExperts > 0 {
                feedForward("\(prefix).shared_expert", "\(from).moe.shared", ("gate_proj", "up_proj", "down_proj"),
                            hidden: moe.sharedExperts * (moe.sharedHidden ?? expertHidden))
                linear("\(prefix).shared_expert_gate.weight", "\(from).moe.shared_gate.weight")
            }
        }
        return layout
    }

    /// The tensors of `layout`, read from the checkpoint's `values` (`read(name)`: a tensor's
    /// location in them).
    static func exportedTensors(_ layout: [TensorMapping], values: [Float],
                                read: (String) throws -> TensorLocation) throws -> ExportedTensors {
        var exported = ExportedTensors()
        exported.values.reserveCapacity(values.count)
        try values.withUnsafeBufferPointer { all in
            for mapping in layout {
                let location = try read(mapping.source)
                let rows = location.shape.count == 1 ? 1 : location.shape[0], columns = location.shape.last ?? 1
                let start = exported.values.count
                mapping.export(all.baseAddress! + location.offset, rows: rows, columns: columns, to: &exported.values)
                exported.entries.append((mapping.native, mapping.nativeShape(rows: rows, columns: columns), start..<exported.values.count))
            }
        }
        return exported
    }

    /// config.json of `target` for `config`'s model.
    static func nativeConfigJSON(_ config: RunConfig, target: NativeClass, vocabularySize: Int, moeLayers: [Int],
                                 rule: RoutingRule?, dataType: Safetensors.DataType) throws -> String {
        let model = config.model
        var object: [String: Any] = [
            "architectures": [target.architecture], "model_type": target.rawValue,
            "vocab_size": vocabularySize, "hidden_size": model.width, "num_hidden_layers": model.layers,
            "num_attention_heads": model.heads, "num_key_value_heads": model.keyValueHeads, "head_dim": model.width / model.heads,
            "max_position_embeddings": model.context, "rope_theta": model.ropeTheta, "rms_norm_eps": model.normEpsilon,
            "tie_word_embeddings": model.tieEmbeddings, "hidden_act": "silu", "attention_bias": false, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": true, "torch_dtype": dataType == .f32 ? "float32" : "bfloat16",
            "num_experts_per_tok": rule?.k ?? 1, "output_router_logits": false, "router_aux_loss_coef": config.moe.balanceLoss,
            "bos_token_id": NSNull(), "eos_token_id": NSNull(), "pad_token_id": NSNull(),
            "rope_parameters": ["rope_type": "default", "rope_theta": model.ropeTheta],
            "swiftmoe_gate": config.moe.gate.rawValue,
        ]
        let moe = config.moe, expertHidden = moe.expertHidden ?? model.ffnHidden
        switch target {
        case .mixtral:
            object["num_local_experts"] = config.moe.experts
            object["intermediate_size"] = expertHidden
            object["sliding_window"] = NSNull()
        case .qwen2Moe, .qwen3Moe:
            object["num_experts"] = moeLayers.isEmpty ? 0 : config.moe.experts
            object["moe_intermediate_size"] = expertHidden
            object["intermediate_size"] = model.ffnHidden
            object["decoder_sparse_step"] = max(1, model.moeEvery)
            object["mlp_only_layers"] = (0..<model.layers).filter { !moeLayers.contains($0) }
            object["norm_topk_prob"] = rule?.renormalize ?? false
            object["use_sliding_window"] = false
            object["sliding_window"] = NSNull()
            if target == .qwen2Moe {
                object["shared_expert_intermediate_size"] = moe.sharedExperts * (moe.sharedHidden ?? expertHidden)
                object["qkv_bias"] = false
                object["head_dim"] = nil
            }
        case .olmoe:
            object["num_experts"] = config.moe.experts
            object["intermediate_size"] = expertHidden
            object["norm_topk_prob"] = rule?.renormalize ?? false
            object["clip_qkv"] = NSNull()
        }
        return String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self) + "\n"
    }
}
