import MoEComm
import MoEIO

/// Registers one block's parameters in the model's stores, in the order that fixes their slab
/// layout (attention norm, attention, FFN norm, then the gate, the experts and EvoMoE's dense FFN
/// of an MoE block, or the dense FFN), and returns the block.
struct BlockBuilder<T: Scalar> {
    let run: RunConfig
    let replicated: ParameterStore<T, Replicated>
    let experts: ParameterStore<T, ExpertSharded>
    let placement: ExpertPlacement
    let communicator: Communicator
    let vocabularySize: Int
    let tokenFrequencies: [Int]?
    /// Exchanges per direction of every MoE layer.
    let dispatchChunks: Int
    /// llama: the rotary tables, one for every block (they depend on the head size and base only).
    let rotary: RotaryEmbedding<T>?

    init(run: RunConfig, replicated: ParameterStore<T, Replicated>, experts: ParameterStore<T, ExpertSharded>, placement: ExpertPlacement,
         communicator: Communicator, vocabularySize: Int, tokenFrequencies: [Int]?, dispatchChunks: Int) {
        (self.run, self.replicated, self.experts, self.placement) = (run, replicated, experts, placement)
        (self.communicator, self.vocabularySize, self.tokenFrequencies, self.dispatchChunks) = (communicator, vocabularySize, tokenFrequencies, dispatchChunks)
        let model = run.model
        rotary = model.architecture == .llama
            ? RotaryEmbedding(headSize: model.width / model.heads, theta: model.ropeTheta, positions: model.context) : nil
    }

    var config: ModelConfig { run.model }
    /// GPT-2's scaled initialisation of the projections into the residual stream.
    var residualDeviation: Double { 0.02 / (2.0 * Double(config.layers)).squareRoot() }
    var moeLayerCount: Int { (0..<config.layers).filter { GPTModel<T>.isMoE(layer: $0, every: config.moeEvery) }.count }

    func block(_ layer: Int) -> TransformerBlock<T> {
        let attentionNorm = norm(path(layer, "attention_norm", .norm))
        let llama = rotary.map {
            CausalSelfAttention<T>.LlamaOptions(keyValueHeads: config.keyValueHeads, rotary: $0, queryKeyNorm: config.queryKeyNorm,
                                                normEpsilon: config.normEpsilon, decayNorms: run.train.decayNormsAndBiases)
        }
        let attention = CausalSelfAttention(store: replicated, path: path(layer, "attention", .attention), width: config.width,
                                            heads: config.heads, residualDeviation: residualDeviation, tile: run.train.attentionTile,
                                            llama: llama)
        let feedForwardNorm = norm(path(layer, "ffn_norm", .norm))
        let feedForward: FeedForwardBlock<T> = GPTModel<T>.isMoE(layer: layer, every: config.moeEvery)
            ? .moe(moeLayer(layer))
            : .dense(feedForward(replicated, path(layer, "ffn", .feedForward)))
        return TransformerBlock(attentionNorm: attentionNorm, attention: attention, feedForwardNorm: feedForwardNorm, feedForward: feedForward)
    }

    /// A normalisation of the width: LayerNorm (gpt2) or RMSNorm (llama).
    func norm(_ path: ParameterPath) -> Normalization<T> {
        let decay = run.train.decayNormsAndBiases
        switch config.architecture {
        case .gpt2: return .layer(LayerNorm(store: replicated, path: path, width: config.width, epsilon: config.normEpsilon, decay: decay))
        case .llama: return .rms(RMSNorm(store: replicated, path: path, width: config.width, epsilon: config.normEpsilon, decay: decay))
        }
    }

    /// A feed-forward network of the architecture's kind (GELU or SwiGLU) in `store`, of hidden
    /// `model.ffn_hidden` unless given.
    func feedForward<Kind>(_ store: ParameterStore<T, Kind>, _ path: ParameterPath, hiddenSize: Int? = nil) -> FeedForward<T, Kind> {
        FeedForward(store: store, path: path, width: config.width, hiddenSize: hiddenSize ?? config.ffnHidden,
                    residualDeviation: residualDeviation, architecture: config.architecture)
    }

    /// The gate, this rank's experts and, for EvoMoE's phase 1, one replicated dense FFN per MoE
    /// position until the spawn.
    func moeLayer(_ layer: Int) -> MoELayer<T> {
        let gate = GateRegistry(run: run, store: replicated, path: path(layer, "moe", .router), vocabularySize: vocabularySize,
                                moeLayerCount: moeLayerCount, tokenFrequencies: tokenFrequencies, spawnStep: run.spawnStep).makeGate()
        let moe = run.moe, expertHidden = moe.expertHidden ?? config.ffnHidden
        var shared: SharedExperts<T>?
        if moe.sharedExperts > 0 {
            let ffn = feedForward(replicated, path(layer, "moe.shared", .feedForward), hiddenSize: moe.sharedExperts * (moe.sharedHidden ?? expertHidden))
            let gate = moe.sharedGate ? Linear(store: replicated, path: path(layer, "moe.shared_gate", .router), inputSize: config.width,
                                               outputSize: 1, deviation: 0.02, bias: false) : nil
            shared = SharedExperts(feedForward: ffn, gate: gate)
        }
        let local = placement.localExperts.map { expert in
            feedForward(experts, path(layer, "moe.experts.\(expert)", .expert), hiddenSize: expertHidden)
        }
        let dense = run.evomoe.spawnFraction > 0 ? feedForward(replicated, path(layer, "moe.dense", .denseFeedForward)) : nil
        let moeLayer = MoELayer(gate: gate, experts: local, placement: placement, communicator: communicator, dense: dense, shared: shared)
        moeLayer.layerIndex = layer
        moeLayer.dispatchChunks = dispatchChunks
        return moeLayer
    }

    /// "blocks.L.component": the parameter's key on disk, with its role and block.
    func path(_ layer: Int, _ component: String, _ role: ParameterRole) -> ParameterPath {
        ParameterPath("blocks.\(layer).\(component)", role: role, block: layer)
    }
}
