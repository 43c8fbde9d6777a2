/// The enumerated config keys, typed: a value outside the list is refused when the config is
/// read (naming the key and the choices), so no later code parses or force-unwraps strings.

/// `moe.gate`: which router, selection policy and auxiliary losses each MoE layer uses
/// (docs/ALGORITHMS.md).
public enum GateKind: String, CaseIterable, Sendable {
    case topk
    case `switch`
    case gshard
    case dts
    case hash
    case base
    case stablemoe
    case expertChoice = "expert_choice"
    case relu
    case activationDTS = "activation_dts"
}

/// `model.architecture`: the decoder block (docs/ARCHITECTURE.md).
public enum Architecture: String, CaseIterable, Sendable {
    /// LayerNorm, learned position embeddings, GELU feed-forward layers, biases.
    case gpt2
    /// RMSNorm, rotary position embeddings, SwiGLU feed-forward layers, no biases,
    /// grouped-query attention: the block of Mixtral, Qwen-MoE and OLMoE.
    case llama
}

/// `model.qk_norm`: RMSNorm on queries and keys before the rotation (llama).
public enum QueryKeyNorm: String, CaseIterable, Sendable {
    case none
    /// Each head's hd values, one gain of hd shared by the heads (Qwen3-MoE).
    case head
    /// The whole query (C) and key (kv_heads * hd) projection of a token (OLMoE).
    case full
}

/// `moe.score`: the router's affinities for the topk gate.
public enum ScoreFunction: String, CaseIterable, Sendable {
    /// p = softmax(l) over the experts.
    case softmax
    /// s_e = sigmoid(l_e), independent per expert (DeepSeek-V3).
    case sigmoid
}

/// `moe.renormalize`: how top-k weights are normalised (docs/ALGORITHMS.md 2.1).
public enum Renormalization: String, CaseIterable, Sendable {
    /// w = p on the selected experts (Switch).
    case none
    /// w = softmax over the selected logits; dropping leaves siblings unchanged (Megatron).
    case beforeDrop = "before_drop"
    /// w = p / Σ kept p (GShard).
    case afterDrop = "after_drop"
}

/// `moe.gshard_second`: how `gshard` picks each token's second expert (docs/ALGORITHMS.md 2.3).
public enum SecondChoicePolicy: String, CaseIterable, Sendable {
    /// argmax over the other experts of l + Gumbel noise: a draw from their softmax.
    case sampling
    case argmax
    /// The runner-up, kept only with probability 2 p2 / (p1 + p2) (original GShard).
    case random
}

/// `dts.schedule`: how the Dense-To-Sparse temperature falls.
public enum TemperatureScheduleKind: String, CaseIterable, Sendable {
    case linear, exp, constant
}

/// `dts.weights`: the DTS gate's combine weights, m ⊙ p (probability) or m ⊙ q (gumbel).
public enum DenseToSparseWeights: String, CaseIterable, Sendable {
    case probability, gumbel
}

/// `dts.activation`: φ of the activation dense-to-sparse gate.
public enum GateActivation: String, CaseIterable, Sendable {
    case sigmoid, tanh
}

/// `gates.hash_table`: a uniform random table, or one balanced by training-token frequency.
public enum HashTableKind: String, CaseIterable, Sendable {
    case random, balanced
}

/// `train.precision`: the format of the large matrix products; `auto` picks bf16 where it
/// measures clearly faster than fp32 on the model's shapes.
public enum PrecisionSetting: String, CaseIterable, Sendable {
    case auto, fp32, bf16
}

/// `train.kernel`: the library of the fp32 matrix products; `auto` takes the one that measures
/// faster on the model's shapes (bf16 products always run on oneDNN).
public enum KernelSetting: String, CaseIterable, Sendable {
    case auto, openblas, onednn
}
