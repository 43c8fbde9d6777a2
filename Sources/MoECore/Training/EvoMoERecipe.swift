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
        spawnStep = EvoMoERecipe.spawnStep(for: run)
    }

    public static func spawnStep(for run: RunConfig) -> Int {
        run.evomoe.spawnFraction > 0 ? max(1, Int((run.evomoe.spawnFraction * Double(run.train.steps)).rounded())) : 0
    }

    /// Whether update `step` trains the dense FFNs.
    public func isDense(step: Int) -> Bool { step < spawnStep }

    /// Puts every MoE layer in the phase of update `step` (after building or loading a model).
    public func restore<T>(_ model: GPTModel<T>, step: Int) {
        for layer in model.moeLayers where layer.dense != nil { layer.isDense = isDense(step: step) }
    }

    /// The replicated tensors unused after the spawn (the dense FFNs): frozen from then on.
    public func retiredEntries<T>(_ model: GPTModel<T>) -> Set<String> {
        Set(model.replicated.entries.map(\.name).filter { $0.contains(".moe.dense.") })
    }

    /// Expert-diversify (docs/ALGORITHMS.md 4.1): every expert e of layer L becomes
    /// (W ⊙ M)/(1 - r) + ξ of the layer's dense FFN W, with M ~ Bernoulli(1 - r) and
    /// ξ ~ N(0, (noise · rms W)²) keyed by (seed, layer, e, tensor), biases copied; the router is
    /// drawn afresh from U(±1/√d). Returns the replicated entries that are new (their optimizer
    /// state must restart) and those now unused (to freeze).
    public func spawn<T>(_ model: GPTModel<T>, seed: Int) -> (fresh: Set<String>, retired: Set<String>) {
        var fresh: Set<String> = []
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

    /// target = (W ⊙ M)/(1 - r) + ξ for the two weight matrices; biases copied.
    private func diversify<T>(_ dense: FeedForward<T, Replicated>, into expert: FeedForward<T, ExpertSharded>, stream: RandomKey) {
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

    /// The router (and its bias, zeroed) of block `layer`, drawn from U(±1/√d); returns their names.
    private func redrawRouter<T>(_ model: GPTModel<T>, layer: Int, key: RandomKey) -> Set<String> {
        let prefix = "blocks.\(layer).moe."
        var redrawn: Set<String> = []
        for entry in model.replicated.entries where entry.name == prefix + "router" || entry.name == prefix + "router_bias" {
            let bound = 1 / Double(model.config.width).squareRoot()
            let values = model.replicated.values + entry.offset
            for index in 0..<entry.count {
                values[index] = entry.name.hasSuffix("bias") ? 0 : T((2 * key.uniform(index) - 1) * bound)
            }
            redrawn.insert(entry.name)
        }
        return redrawn
    }
}
