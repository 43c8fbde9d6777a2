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

    var config: ModelConfig { run.model }
    /// GPT-2's scaled initialisation of the projections into the residual stream.
    var residualDeviation: Double { 0.02 / (2.0 * Double(config.layers)).squareRoot() }
    var moeLayerCount: Int { (0..<config.layers).filter { GPTModel<T>.isMoE(layer: $0, every: config.moeEvery) }.count }

    func block(_ layer: Int) -> TransformerBlock<T> {
        let width = config.width, decayNorms = run.train.decayNormsAndBiases
        let attentionNorm = LayerNorm(store: replicated, path: path(layer, "attention_norm", .norm), width: width, decay: decayNorms)
        let attention = CausalSelfAttention(store: replicated, path: path(layer, "attention", .attention), width: width,
                                            heads: config.heads, residualDeviation: residualDeviation, tile: run.train.attentionTile)
        let feedForwardNorm = LayerNorm(store: replicated, path: path(layer, "ffn_norm", .norm), width: width, decay: decayNorms)
        let feedForward: FeedForwardBlock<T> = GPTModel<T>.isMoE(layer: layer, every: config.moeEvery)
            ? .moe(moeLayer(layer))
            : .dense(FeedForward(store: replicated, path: path(layer, "ffn", .feedForward), width: width,
                                 hiddenSize: config.ffnHidden, residualDeviation: residualDeviation))
        return TransformerBlock(attentionNorm: attentionNorm, attention: attention, feedForwardNorm: feedForwardNorm, feedForward: feedForward)
    }

    /// The gate, this rank's experts and, for EvoMoE's phase 1, one replicated dense FFN per MoE
    /// position until the spawn.
    func moeLayer(_ layer: Int) -> MoELayer<T> {
        let gate = GateRegistry(run: run, store: replicated, path: path(layer, "moe", .router), vocabularySize: vocabularySize,
                                moeLayerCount: moeLayerCount, tokenFrequencies: tokenFrequencies, spawnStep: run.spawnStep).makeGate()
        let local = placement.localExperts.map { expert in
            FeedForward(store: experts, path: path(layer, "moe.experts.\(expert)", .expert), width: config.width,
                        hiddenSize: config.ffnHidden, residualDeviation: residualDeviation)
        }
        let dense = run.evomoe.spawnFraction > 0
            ? FeedForward(store: replicated, path: path(layer, "moe.dense", .denseFeedForward), width: config.width,
                          hiddenSize: config.ffnHidden, residualDeviation: residualDeviation) : nil
        let moeLayer = MoELayer(gate: gate, experts: local, placement: placement, communicator: communicator, dense: dense)
        moeLayer.layerIndex = layer
        moeLayer.dispatchChunks = dispatchChunks
        return moeLayer
    }

    /// "blocks.L.component": the parameter's key on disk, with its role and block.
    func path(_ layer: Int, _ component: String, _ role: ParameterRole) -> ParameterPath {
        ParameterPath("blocks.\(layer).\(component)", role: role, block: layer)
    }
}
