import MoEIO
/// EvoMoE's recipe (docs/ALGORITHMS.md 4): train one dense FFN per MoE position until update T_s,
/// then spawn the experts from it ("expert-diversify") and route sparsely from there (with the
/// DTS gate, "gate-sparsify", whose temperature clock starts at T_s). The trainer owns it and
/// asks it, at each step and after a resume, which phase the model is in.
public struct EvoMoERecipe: Sendable {
    public let settings: EvoMoEConfig
    /// T_s: the update at which the experts are spawned (0: no dense phase).
    public let spawnStep: Int

    public init(_ run: RunConfig) {
        settings = run.evomoe
        spawnStep = run.spawnStep
    }

    /// Whether update `step` trains the dense FFNs.
    public func isDense(step: Int) -> Bool { step < spawnStep }

    /// Puts every MoE layer in the phase of update `step` (after building or loading a model).
    public func restore<T>(_ model: GPTModel<T>, step: Int) {
        for layer in model.moeLayers where layer.dense != nil { layer.isDense = isDense(step: step) }
    }

    /// After loading a checkpoint saved at `step`: the model's phase, and the dense FFNs frozen
    /// when it is past the spawn.
    func restore(_ model: GPTModel<Float>, step: Int, optimizer: AdamW<Float, Replicated>) {
        restore(model, step: step)
        if !isDense(step: step) {
            for entry in retiredEntries(model) { optimizer.freeze(entry) }
        }
    }

    /// The spawn at T_s, in a training run: the experts from the dense FFNs (with every replicated
    /// master value present: collective with sharded masters); new tensors restart their AdamW
    /// state, the dense FFNs are frozen from here on.
    func spawnExperts(_ model: GPTModel<Float>, seed: Int, optimizers: (AdamW<Float, Replicated>, AdamW<Float, ExpertSharded>),
                      sync: GradientSync) throws {
        let (fresh, retired) = try sync.withAllReplicatedValues(model, writing: true) { spawn(model, seed: seed) }
        model.experts.didWriteAllValues()
        optimizers.0.reset(entries: fresh)
        optimizers.1.reset(entries: Set(model.experts.entries.indices))
        for entry in retired { optimizers.0.freeze(entry) }
    }

    /// The replicated entries unused after the spawn (the dense FFNs): frozen from then on.
    public func retiredEntries<T>(_ model: GPTModel<T>) -> Set<Int> {
        model.replicated.entryIndices(role: .denseFeedForward)
    }

    /// Expert-diversify (docs/ALGORITHMS.md 4.1): every expert e of layer L becomes
    /// (W ⊙ M)/(1 - r) + ξ of the layer's dense FFN W, with M ~ Bernoulli(1 - r) and
    /// ξ ~ N(0, (noise · rms W)²) keyed by (seed, layer, e, tensor), biases copied; the router is
    /// drawn afresh from U(±1/√d). Returns the replicated entries that are new (their optimizer
    /// state must restart) and those now unused (to freeze), by index.
    public func spawn<T>(_ model: GPTModel<T>, seed: Int) -> (fresh: Set<Int>, retired: Set<Int>) {
        var fresh: Set<Int> = []
        let key = RandomKey(UInt64(seed)).derive("spawn")
        for layer in model.moeLayers {
            guard let dense = layer.dense, layer.isDense else { continue }
            for (local, expert) in layer.experts.enumerated() {
                let stream = key.derive(layer.layerIndex, model.placement.localExperts.lowerBound + local)
                diversify(dense, into: expert, stream: stream)
            }
            fresh.formUnion(redrawRouter(model, layer: layer.layerIndex, key: key.derive("router").derive(layer.layerIndex)))
            layer.isDense = false
        }
        return (fresh, retiredEntries(model))
    }

    /// target = (W ⊙ M)/(1 - r) + ξ for the weight matrices; biases copied. With r = 0 and no
    /// noise, an exact copy (upcycling's identical experts).
    func diversify<T>(_ dense: FeedForward<T, Replicated>, into expert: FeedForward<T, ExpertSharded>, stream: RandomKey) {
        let pairs = [(dense.up.weight, expert.up.weight), (dense.down.weight, expert.down.weight)]
        for (tensor, (source, target)) in pairs.enumerated() {
            let count = source.count
            let rms = (Kernels.sumOfSquares(source.value, count: count) / Double(count)).squareRoot()
            let draws = stream.derive(tensor)
            let scale = settings.rescale && settings.maskRatio < 1 ? 1 / (1 - settings.maskRatio) : 1
            for index in 0..<count {
                let keep = draws.uniform(2 * index) >= settings.maskRatio
                let noise = settings.noise * rms * draws.normal(2 * index + 1)
                target.value[index] = T((keep ? Double(source.value[index]) * scale : 0) + noise)
            }
        }
        for (source, target) in [(dense.up.bias, expert.up.bias), (dense.down.bias, expert.down.bias)] {
            if let source, let target { target.value.update(from: source.value, count: source.count) }
        }
    }

    /// The router (and its bias, zeroed) of block `layer`, drawn from U(±1/√d); returns their indices.
    private func redrawRouter<T>(_ model: GPTModel<T>, layer: Int, key: RandomKey) -> Set<Int> {
        let store = model.replicated
        let redrawn = store.entryIndices(role: .router, block: layer).union(store.entryIndices(role: .routerBias, block: layer))
        let bound = 1 / Double(model.config.width).squareRoot()
        for entry in redrawn.map({ store.entries[$0] }) {
            let values = store.values + entry.offset
            for index in 0..<entry.count {
                values[index] = entry.role == .routerBias ? 0 : T((2 * key.uniform(index) - 1) * bound)
            }
        }
        return redrawn
    }
}
