import MoEComm
import MoEIO

/// The feed-forward half of a block: a dense FFN (replicated) or an MoE layer.
public enum FeedForwardBlock<T: Scalar> {
    case dense(FeedForward<T, Replicated>)
    case moe(MoELayer<T>)
}

public struct TransformerBlock<T: Scalar> {
    public let attentionNorm: Normalization<T>
    public let attention: CausalSelfAttention<T>
    public let feedForwardNorm: Normalization<T>
    public let feedForward: FeedForwardBlock<T>
}

public struct ForwardResult: Sendable {
    /// Mean cross-entropy over this rank's tokens (nats per token).
    public var localLoss: Double
    /// Sum of cross-entropy over this rank's tokens.
    public var localLossSum: Double
    /// Σ over MoE layers of their weighted auxiliary losses (global values).
    public var auxiliaryLoss: Double
    /// Each MoE layer's routing statistics, in block order.
    public var moeLayers: [RoutingStatistics]
}

/// A pre-norm decoder, GPT-2 or Llama style (`model.architecture`):
///   x = embed(tokens); per block: x += attn(ln1(x)); x += ffn(ln2(x)); logits = ln_f(x) Wᵀ.
/// gpt2: LayerNorm, learned positions, GELU FFNs, biases; llama: RMSNorm, rotary positions
/// inside attention, SwiGLU FFNs, no biases, grouped-query attention.
/// Shapes: B sequences of T tokens, N = B*T rows, C width, V vocabulary.
public final class GPTModel<T: Scalar> {
    public let run: RunConfig
    public let config: ModelConfig
    public let moeConfig: MoEConfig
    public let vocabularySize: Int
    public let replicated = ParameterStore<T, Replicated>()
    public let experts = ParameterStore<T, ExpertSharded>()
    public let placement: ExpertPlacement
    public let embedding: Embedding<T>
    public private(set) var blocks: [TransformerBlock<T>] = []
    public let finalNorm: Normalization<T>
    /// Output projection [C, V] when embeddings are not tied.
    public let head: Parameter<T, Replicated>?
    let communicator: Communicator
    /// The format of the large matrix products (`train.precision` resolved on this CPU; always
    /// fp32 for Double models, which exist for gradient checks).
    public private(set) var precision = Precision.fp32
    /// The products' kernels and precision as measured and chosen at start (nil for Double
    /// models, whose products are OpenBLAS dgemm).
    public private(set) var kernels: KernelChoice?

    // Activations, per block l: residual[l] is the block's input, residual[L] the final stream.
    var residual: [Tensor<T>] = [], attentionNormed: [Tensor<T>] = [], middle: [Tensor<T>] = [], feedForwardNormed: [Tensor<T>] = []
    var attentionCaches: [CausalSelfAttention<T>.Cache] = []
    var normCaches: [(LayerNorm<T>.Cache, LayerNorm<T>.Cache)] = []
    var denseHidden: [FeedForwardStorage<T>] = []
    /// The MoE layers' deferred expert weight gradients of the running backward (ExpertGradientBacklog).
    let expertBacklog = ExpertGradientBacklog<T>()
    let finalNormed = Tensor<T>(), finalNormCache = LayerNorm<T>.Cache()
    let logits = Tensor<T>()
    let scratch = Tensor<T>(), dResidual = Tensor<T>(), dScratch = Tensor<T>(), dHidden = Tensor<T>()
    var tokens: [Int32] = [], targets: [Int32] = []
    var layerStatistics: [RoutingStatistics] = []
    var batch = 0, length = 0
    /// Attention's and the output projection's times since the last `takeProfile()`.
    var attentionSeconds = 0.0, outputSeconds = 0.0

    /// Builds the model of `run` (its model, moe, gate and EvoMoE sections). `tokenFrequencies`
    /// (training-token counts per id) feed the balanced hash table.
    public init(_ run: RunConfig, vocabularySize: Int, communicator: Communicator, tokenFrequencies: [Int]? = nil) throws {
        let config = run.model, moe = run.moe, training = run.train
        // auto: one exchange on one host (shared memory), the pipeline across hosts.
        let dispatchChunks = try training.dispatchChunks ?? (communicator.ranksShareOneHost() ? 1 : 4)
        self.run = run
        self.config = config
        self.moeConfig = moe
        self.vocabularySize = vocabularySize
        self.communicator = communicator
        let placement = try ExpertPlacement(expertCount: moe.experts, rankCount: communicator.size, rank: communicator.rank)
        try ModelSize(run, vocabularySize: vocabularySize, localExperts: placement.localExperts.count).check(run, vocabularySize: vocabularySize)
        self.placement = placement
        let replicated = self.replicated, width = config.width
        embedding = Embedding(store: replicated, vocabularySize: vocabularySize, context: config.context, width: width,
                              decay: training.decayEmbeddings, learnedPositions: config.architecture == .gpt2)
        let builder = BlockBuilder(run: run, replicated: replicated, experts: experts, placement: placement, communicator: communicator,
                                   vocabularySize: vocabularySize, tokenFrequencies: tokenFrequencies, dispatchChunks: dispatchChunks)
        blocks = (0..<config.layers).map(builder.block)
        finalNorm = builder.norm(ParameterPath("final_norm", role: .norm))
        head = config.tieEmbeddings ? nil : replicated.add(ParameterPath("head.weight", role: .head), rows: width, columns: vocabularySize,
                                                          weightDecay: true, initialization: .normal(standardDeviation: 0.02),
                                                          productOnly: true)
        if T.self == Float.self {
            let choice = try KernelChoice.resolve(run, communicator: communicator) { matmul in
                CausalSelfAttention<Float>.secondsOfHeadProducts(batch: training.batchSize, length: config.context, width: width,
                                                                 heads: config.heads, matmul: matmul, repeats: 4)
            }
            (kernels, precision) = (choice, choice.precision)
            BLASInfo.productsRun(onOpenBLAS: choice.precision == .fp32 && choice.floatKernel == .openblas)
            if choice.precision == .bf16 || choice.floatKernel == .onednn {
                let matmul = try OneDNNMatmul(precision: choice.precision)
                replicated.runProducts(on: matmul)
                experts.runProducts(on: matmul)
            } else if choice.headKernel == .onednn {
                replicated.runHeadProducts(on: try OneDNNMatmul(precision: .fp32))
            }
        }
        for _ in 0...config.layers { residual.append(Tensor()) }
        for _ in 0..<config.layers {
            attentionNormed.append(Tensor()); middle.append(Tensor()); feedForwardNormed.append(Tensor())
            attentionCaches.append(.init()); normCaches.append((.init(), .init()))
            denseHidden.append(FeedForwardStorage())
        }
    }

    /// Blocks 1-based n, 2n, ... are MoE (with moe_every = 1: all; 0: none).
    public static func isMoE(layer: Int, every: Int) -> Bool { every > 0 && (layer + 1) % every == 0 }

    public func initializeParameters(seed: Int) {
        let key = RandomKey(UInt64(seed)).derive("parameters")
        replicated.initialize(key: key)
        experts.initialize(key: key)
        for layer in moeLayers { layer.gate.initializeState(seed: seed, layer: layer.layerIndex) }
        replicated.didWriteAllValues()
        experts.didWriteAllValues()
    }

    /// The MoE layers in block order (built once: read every step).
    public private(set) lazy var moeLayers: [MoELayer<T>] =
        blocks.compactMap { if case let .moe(layer) = $0.feedForward { return layer } else { return nil } }

    /// Forward over B sequences of T tokens. `targets` nil: no loss (generation), logits kept.
    /// routing: the step's random key and whether capacity uses the training factor.
    public func forward(tokens tokenIds: [Int32], targets targetIds: [Int32]?, batch: Int, length: Int,
                        training: Bool, globalTokens: Int, firstGlobalToken: Int, noiseKey: RandomKey,
                        step: Int = 0, lossWeight: Double = 1, dropless: Bool = false) throws -> ForwardResult {
        precondition(tokenIds.count == batch * length, "tokens must be [B*T]")
        precondition(length <= config.context, "sequence longer than the context")
        let rows = batch * length
        self.batch = batch
        self.length = length
        tokens = tokenIds
        targets = targetIds ?? []
        resizeActivations(rows: rows)
        tokenIds.withUnsafeBufferPointer { embedding.forward(tokens: $0.baseAddress!, batch: batch, length: length, into: residual[0].pointer) }
        // Reused from step to step (moved out and back, so no allocation once the previous
        // step's report is gone).
        var statistics = layerStatistics
        layerStatistics = []
        statistics.removeAll(keepingCapacity: true)
        defer { layerStatistics = statistics }
        var auxiliary = 0.0
        for (layer, block) in blocks.enumerated() {
            let input = residual[layer], mid = middle[layer]
            // Later blocks' attention norms ran with the residual sum that ends the block before.
            if layer == 0 {
                block.attentionNorm.forward(input.pointer, rows: rows, into: attentionNormed[layer].pointer, cache: normCaches[layer].0)
            }
            Clock.measure(&attentionSeconds) {
                block.attention.forward(attentionNormed[layer].pointer, batch: batch, length: length, into: scratch.pointer,
                                        cache: attentionCaches[layer])
            }
            block.feedForwardNorm.forward(sumOf: input.pointer, scratch.pointer, writingSumTo: mid.pointer, rows: rows,
                                          into: feedForwardNormed[layer].pointer, cache: normCaches[layer].1)
            switch block.feedForward {
            case let .dense(ffn):
                denseHidden[layer].resize(rows: rows, for: ffn, rounded: precision == .bf16)
                ffn.forward(feedForwardNormed[layer].pointer, rows: rows, into: scratch.pointer, hidden: denseHidden[layer].hidden())
            case let .moe(moe):
                try tokenIds.withUnsafeBufferPointer { ids in
                    var context = RoutingContext(training: training, communicator: communicator, globalTokens: globalTokens,
                                                 firstGlobalToken: firstGlobalToken, tokenIds: ids.baseAddress,
                                                 noiseKey: noiseKey.derive(layer), step: step)
                    context.lossWeight = lossWeight
                    context.dropless = dropless
                    context.sequenceLength = length
                    try moe.forward(feedForwardNormed[layer].pointer, rows: rows, into: scratch.pointer, context: context)
                }
                statistics.append(moe.routing.statistics)
                auxiliary += moe.routing.statistics.auxiliaryLoss
            }
            addFeedForwardOutput(layer: layer, rows: rows)
        }
        Clock.measure(&outputSeconds) { computeLogits(rows: rows) }
        guard let targetIds else {
            return ForwardResult(localLoss: 0, localLossSum: 0, auxiliaryLoss: auxiliary, moeLayers: statistics)
        }
        precondition(targetIds.count == rows, "targets must be [B*T]")
        let lossSum = Clock.measure(&outputSeconds) { crossEntropySum(targets: targetIds, rows: rows) }
        return ForwardResult(localLoss: lossSum / Double(rows), localLossSum: lossSum, auxiliaryLoss: auxiliary,
                             moeLayers: statistics)
    }

    /// x_out = x_mid + ffn(ln2(x_mid)) (the FFN's output in `scratch`) into residual[layer + 1],
    /// normalised in the same pass by the next block's attention norm (the last block's output
    /// goes to the final norm in `computeLogits`).
    private func addFeedForwardOutput(layer: Int, rows: Int) {
        let mid = middle[layer], output = residual[layer + 1]
        guard layer + 1 < blocks.count else {
            return Kernels.sum(mid.pointer, scratch.pointer, into: output.pointer, count: rows * config.width)
        }
        blocks[layer + 1].attentionNorm.forward(sumOf: mid.pointer, scratch.pointer, writingSumTo: output.pointer, rows: rows,
                                                into: attentionNormed[layer + 1].pointer, cache: normCaches[layer + 1].0)
    }

    /// Σ over rows of -log p(target) from the logits of `computeLogits` (which become the
    /// probabilities, for backward).
    private func crossEntropySum(targets: [Int32], rows: Int) -> Double {
        targets.withUnsafeBufferPointer {
            CrossEntropy.forward(logits: logits.pointer, targets: $0.baseAddress!, rows: rows, vocabularySize: vocabularySize)
        }
    }

    /// The activations of a forward over `rows` rows (their buffers grow once, then are reused).
    func resizeActivations(rows: Int) {
        let width = config.width
        for tensor in residual { tensor.resize(rows: rows, columns: width) }
        for layer in 0..<config.layers {
            attentionNormed[layer].resize(rows: rows, columns: width)
            middle[layer].resize(rows: rows, columns: width)
            feedForwardNormed[layer].resize(rows: rows, columns: width)
        }
        scratch.resize(rows: rows, columns: width)
    }

    /// logits [N, V] = final_norm(residual[L]) · head (or the token table, transposed, when tied).
    func computeLogits(rows: Int) {
        let width = config.width
        finalNormed.resize(rows: rows, columns: width)
        finalNorm.forward(residual[config.layers].pointer, rows: rows, into: finalNormed.pointer, cache: finalNormCache)
        logits.resize(rows: rows, columns: vocabularySize)
        let matmul = replicated.matmul
        if let head {
            matrixProduct(matmul, m: rows, n: vocabularySize, k: width, a: .values(finalNormed.pointer), b: head.operand, c: logits.pointer)
        } else {
            matrixProduct(matmul, transposeB: true, m: rows, n: vocabularySize, k: width, a: .values(finalNormed.pointer),
                          b: embedding.tokenTable.operand, c: logits.pointer)
        }
    }

    /// Logits of row `row` from the last forward (generation; valid only with targets nil).
    public func logitsRow(_ row: Int) -> UnsafeMutablePointer<T> { logits.row(row) }

    /// Adjoint of `forward` for loss = Σ CE / globalTokens + Σ auxiliary. Accumulates into
    /// both parameter stores' gradients.
    /// `blockDone(l)` runs once block l's parameters have their final gradients of this pass
    /// (blocks finish from the last to the first), for overlapping their all-reduce.
    public func backward(globalTokens: Int, blockDone: ((Int) throws -> Void)? = nil) throws {
        let rows = batch * length
        Clock.measure(&outputSeconds) { outputBackward(rows: rows, globalTokens: globalTokens) }
        for layer in stride(from: config.layers - 1, through: 0, by: -1) {
            let block = blocks[layer]
            // x_out = x_mid + ffn(ln2(x_mid)); dResidual holds d x_out and becomes d x_mid.
            dScratch.zero()
            switch block.feedForward {
            case let .dense(ffn):
                dHidden.resize(rows: rows, columns: ffn.scratchColumns)
                ffn.backward(feedForwardNormed[layer].pointer, dResidual.pointer, rows: rows, dx: dScratch.pointer,
                             hidden: denseHidden[layer].hidden(), scratch: dHidden.pointer)
            case let .moe(moe):
                // One rank never waits for a peer: its experts' weight gradients run in their layer,
                // where their operands are still in cache.
                try moe.backward(feedForwardNormed[layer].pointer, dResidual.pointer, rows: rows, dx: dScratch.pointer,
                                 backlog: communicator.size > 1 ? expertBacklog : nil)
            }
            block.feedForwardNorm.backward(middle[layer].pointer, dScratch.pointer, rows: rows, dx: dResidual.pointer,
                                           cache: normCaches[layer].1)
            // x_mid = x_in + attn(ln1(x_in)); dResidual becomes d x_in.
            dScratch.zero()
            Clock.measure(&attentionSeconds) {
                block.attention.backward(attentionNormed[layer].pointer, dResidual.pointer, batch: batch, length: length,
                                         dx: dScratch.pointer, cache: attentionCaches[layer])
            }
            block.attentionNorm.backward(residual[layer].pointer, dScratch.pointer, rows: rows, dx: dResidual.pointer,
                                         cache: normCaches[layer].0)
            try blockDone?(layer)
        }
        tokens.withUnsafeBufferPointer {
            embedding.backward(tokens: $0.baseAddress!, batch: batch, length: length, dOut: dResidual.pointer)
        }
        // The experts' weight gradients the waits of the MoE layers' exchanges left over.
        expertBacklog.runAll()
    }

    /// Adjoint of the output projection (`computeLogits`) and the cross-entropy: dResidual[L]
    /// = final_norm'ᵀ (dlogits Wᵀ), and the head's (or the token table's) gradient.
    private func outputBackward(rows: Int, globalTokens: Int) {
        let width = config.width
        targets.withUnsafeBufferPointer {
            CrossEntropy.backward(probabilities: logits.pointer, targets: $0.baseAddress!, rows: rows,
                                  vocabularySize: vocabularySize, scale: 1 / T(globalTokens))
        }
        // logits = ln_f(x) W  =>  d ln_f(x) = dlogits Wᵀ, dW += ln_f(x)ᵀ dlogits
        dScratch.resize(rows: rows, columns: width)
        let matmul = replicated.matmul
        let dLogits = ProductOperand<T>.roundedOnce(logits.pointer, count: rows * vocabularySize, into: matmul?.rounding?.right)
        if let head {
            matrixProduct(matmul, transposeA: true, m: width, n: vocabularySize, k: rows, a: .values(finalNormed.pointer),
                          b: dLogits, beta: 1, c: head.gradient)
            matrixProduct(matmul, transposeB: true, m: rows, n: width, k: vocabularySize, a: dLogits, b: head.operand,
                          c: dScratch.pointer)
        } else {
            // dLogits is A here, so finalNormed (B) goes through `left`: round it explicitly.
            let normed = ProductOperand<T>.roundedOnce(finalNormed.pointer, count: rows * width, into: matmul?.rounding?.left)
            matrixProduct(matmul, transposeA: true, m: vocabularySize, n: width, k: rows, a: dLogits, b: normed,
                          beta: 1, c: embedding.tokenTable.gradient)
            matrixProduct(matmul, m: rows, n: width, k: vocabularySize, a: dLogits, b: embedding.tokenTable.operand,
                          c: dScratch.pointer)
        }
        dResidual.resize(rows: rows, columns: width, zero: true)
        finalNorm.backward(residual[config.layers].pointer, dScratch.pointer, rows: rows, dx: dResidual.pointer, cache: finalNormCache)
    }

    /// The first activation of the last forward that is not finite, named for error messages.
    public func firstNonFiniteActivation() -> String? {
        for (index, tensor) in residual.enumerated() where !Kernels.isFinite(tensor.pointer, count: tensor.count) {
            return index == 0 ? "the embedding output" : "the output of block \(index - 1)"
        }
        return Kernels.isFinite(logits.pointer, count: logits.count) ? nil : "the output projection"
    }

    /// Attention and MoE-layer times accumulated since the previous call; resets them.
    public func takeProfile() -> StepProfile {
        var profile = StepProfile()
        (profile.attention, profile.output) = (attentionSeconds, outputSeconds)
        (attentionSeconds, outputSeconds) = (0, 0)
        for layer in moeLayers {
            profile += layer.profile
            layer.resetProfile()
        }
        return profile
    }

    public func zeroGradients() {
        replicated.zeroGradients()
        experts.zeroGradients()
        for layer in moeLayers { layer.gradientsChanged() }
    }

    /// Σ g² over this rank's expert gradients as the MoE layers summed them after their products
    /// (`MoELayer.gradientSquares`); nil unless those sums are current and cover the whole store.
    public func expertGradientSquares() -> Double? {
        var sum = 0.0, count = 0
        for layer in moeLayers {
            guard let squares = layer.gradientSquares else { return nil }
            sum += squares.sum
            count += squares.count
        }
        return count == experts.count ? sum : nil
    }

    /// Parameters per token that do work: replicated ones plus k experts' worth per MoE layer
    /// (embedding tables count once, as in the usual 6N FLOPs estimate).
    public var parameterCounts: (total: Int, active: Int) {
        let total = replicated.count + moeLayers.count * moeConfig.experts * parametersPerExpert
        return (total, routedAroundParameters + moeLayers.count * moeConfig.topK * parametersPerExpert)
    }

    /// One routed expert FFN (two matrices and their biases, or SwiGLU's three); EvoMoE's dense
    /// FFN has the same shape (`moe.expert_hidden` = `model.ffn_hidden` with EvoMoE).
    var parametersPerExpert: Int {
        FeedForward<T, ExpertSharded>.parameterCount(width: config.width, hiddenSize: moeConfig.expertHidden ?? config.ffnHidden,
                                                     architecture: config.architecture)
    }

    /// Replicated parameters every token passes through. EvoMoE's dense FFNs are left out: a
    /// token uses one only before the spawn, where it counts as one routed assignment
    /// (`RoutingStatistics.dense`).
    var routedAroundParameters: Int {
        replicated.count - replicated.entries.filter { $0.role == .denseFeedForward }.reduce(0) { $0 + $1.count }
    }

    /// Model FLOPs of training on `tokens` tokens whose MoE layers computed `expertAssignments`
    /// (token, expert) pairs in all, summed over layers: 6 per parameter a token passes through
    /// (forward 2, backward 4 per multiply-add), plus causal attention, 6 L T C per token (QKᵀ and
    /// AV over T/2 keys on average, forward and backward). What a gate actually computes is
    /// counted: a dropped assignment costs nothing, a soft DTS token costs every expert it kept.
    public func trainingFlops(tokens: Int, expertAssignments: Int64) -> Double {
        let perToken = 6 * Double(routedAroundParameters) + 6 * Double(config.layers * config.context * config.width)
        return Double(tokens) * perToken + 6 * Double(parametersPerExpert) * Double(expertAssignments)
    }
}
