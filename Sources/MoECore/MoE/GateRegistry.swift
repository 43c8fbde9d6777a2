import MoEIO
/// Builds each MoE layer's gate from the config: one line per `moe.gate` value, naming its router,
/// policy and losses (docs/ARCHITECTURE.md shows how to add one).
struct GateRegistry<T: Scalar> {
    let run: RunConfig
    /// Where the gate's parameters are registered, and under which prefix ("blocks.L.moe").
    let store: ParameterStore<T, Replicated>
    let path: ParameterPath
    let vocabularySize: Int
    let moeLayerCount: Int
    let tokenFrequencies: [Int]?
    /// T_s: the DTS temperature clock starts at EvoMoE's spawn.
    let spawnStep: Int

    var experts: Int { run.moe.experts }

    func makeGate() -> Gate<T> {
        let moe = run.moe, gates = run.gates
        switch moe.gate {
        case .topk: return Gate(kind: .topk, expertCount: experts, router: linearRouter(jitter: moe.jitter), policy: topK(moe.renormalize, scoring: scoring),
                                losses: topKLosses(sigmoid: moe.score == .sigmoid))
        case .switch: return Gate(kind: .switch, expertCount: experts, router: linearRouter(jitter: moe.jitter), policy: topK(.none), losses: topKLosses())
        case .gshard: return Gate(kind: .gshard, expertCount: experts, router: linearRouter(jitter: moe.jitter), policy: topK(.afterDrop, second: moe.gshardSecond), losses: topKLosses(firstChoicesOnly: true))
        case .dts: return Gate(kind: .dts, expertCount: experts, router: linearRouter(), policy: denseToSparse(.gumbelSoftmax(weightsFromGumbel: run.dts.weights == .gumbel)), losses: [SelectionBalanceLoss(coefficient: run.dts.auxLoss, experts: experts)])
        case .activationDTS: return Gate(kind: .activationDTS, expertCount: experts, router: linearRouter(bias: true), policy: denseToSparse(.activation(tanh: run.dts.activation == .tanh)), losses: [SelectionBalanceLoss(coefficient: run.dts.auxLoss, experts: experts)])
        case .relu: return Gate(kind: .relu, expertCount: experts, router: linearRouter(), policy: ThresholdPolicy(expertCount: experts, transform: .relu, schedule: nil, threshold: 0), losses: [sparsityRegularizer()])
        case .expertChoice: return Gate(kind: .expertChoice, expertCount: experts, router: linearRouter(), policy: ExpertChoicePolicy(expertCount: experts, capacityFactor: gates.expertChoiceCapacity))
        case .base: return Gate(kind: .base, expertCount: experts, router: centroids { RandomKey(UInt64($0)).derive("centroids").derive($1) }, policy: BalancedAssignmentPolicy(expertCount: experts, epsilon: gates.baseEpsilon))
        case .hash: return Gate(kind: .hash, expertCount: experts, router: nil, policy: hashTable())
        case .stablemoe: return stableMoE()
        }
    }

    // MARK: routers

    /// Router weights start as a truncated normal of variance 0.1 / C (and the bias at 0).
    func linearRouter(jitter: Double = 0, bias: Bool = false) -> LinearRouter<T> {
        let width = run.model.width
        let bias = bias ? store.add(path.appending("router_bias", role: .routerBias), rows: 1, columns: experts, weightDecay: false, initialization: .zeros) : nil
        let weight = store.add(path.appending("router", role: .router), rows: width, columns: experts, weightDecay: false,
                               initialization: .truncatedNormal(standardDeviation: (0.1 / Double(width)).squareRoot()))
        return LinearRouter(weight: weight, bias: bias, jitter: jitter)
    }

    /// BASE's and StableMoE's centroids: orthogonal columns of norm 0.1, keyed by seed and layer.
    func centroids(key: @escaping (_ seed: Int, _ layer: Int) -> RandomKey) -> LinearRouter<T> {
        let weight = store.add(path.appending("centroids", role: .routingTable), rows: run.model.width, columns: experts, weightDecay: false, initialization: .zeros)
        return LinearRouter(weight: weight, orthogonal: (gain: 0.1, key: key))
    }

    // MARK: policies and losses

    func topK(_ renormalization: Renormalization, second: SecondChoicePolicy? = nil,
              scoring: TopKPolicy<T>.Scoring = .init()) -> TopKPolicy<T> {
        let moe = run.moe
        return TopKPolicy(expertCount: experts, k: moe.topK, renormalization: renormalization, capacityFactor: moe.capacityFactor,
                          evalCapacityFactor: moe.evalCapacityFactor, minimumCapacity: moe.minCapacity, secondChoice: second,
                          scoring: scoring)
    }

    /// The topk gate's scoring: score function, routed scale, loss-free balancing, groups.
    var scoring: TopKPolicy<T>.Scoring {
        var scoring = TopKPolicy<T>.Scoring()
        let moe = run.moe
        (scoring.function, scoring.routedScale, scoring.biasUpdateRate) = (moe.score, moe.routedScale, moe.biasUpdateRate)
        (scoring.groups, scoring.groupLimit) = (moe.expertGroups, moe.groupLimit)
        return scoring
    }

    /// The balance loss (always with softmax scores, as its value is logged), the z-loss and
    /// the sequence-wise balance loss when they have a weight.
    func topKLosses(firstChoicesOnly: Bool = false, sigmoid: Bool = false) -> [any AuxiliaryLoss<T>] {
        var losses: [any AuxiliaryLoss<T>] = []
        if !sigmoid {
            losses.append(LoadBalanceLoss<T>(coefficient: run.moe.balanceLoss, experts: experts, k: run.moe.topK, firstChoicesOnly: firstChoicesOnly))
        }
        if run.moe.zLoss > 0 { losses.append(RouterZLoss<T>(coefficient: run.moe.zLoss)) }
        if run.moe.sequenceBalanceLoss > 0 {
            losses.append(SequenceBalanceLoss<T>(coefficient: run.moe.sequenceBalanceLoss, experts: experts, k: run.moe.topK))
        }
        return losses
    }

    func denseToSparse(_ transform: ThresholdPolicy<T>.Transform) -> ThresholdPolicy<T> {
        let dts = run.dts, steps = Double(run.train.steps)
        var (maximum, minimum) = (dts.tauMax, dts.tauMin)
        if case .activation = transform { (maximum, minimum) = (dts.activationTauMax, dts.activationTauMin) }
        let schedule = TemperatureSchedule(kind: dts.schedule, maximum: maximum, minimum: minimum,
                                           annealSteps: Int((dts.annealFraction * steps).rounded()),
                                           hardStep: dts.hardFraction >= 1 ? nil : Int((dts.hardFraction * steps).rounded()),
                                           startStep: spawnStep)
        return ThresholdPolicy(expertCount: experts, transform: transform, schedule: schedule, threshold: dts.threshold)
    }

    func sparsityRegularizer() -> SparsityRegularizer<T> {
        let gates = run.gates
        return SparsityRegularizer(experts: experts, targetActive: run.moe.topK, initialLambda: gates.reluInitialLambda,
                                   multiplier: gates.reluMultiplier, targetSparsity: gates.reluTargetSparsity, layerCount: moeLayerCount)
    }

    func hashTable() -> TableLookupPolicy<T> {
        let table = store.add(path.appending("hash_table", role: .routingTable), rows: 1, columns: vocabularySize, weightDecay: false, initialization: .zeros)
        return TableLookupPolicy(table: table, expertCount: experts,
                                 balancedBy: run.gates.hashTable == .balanced ? (tokenFrequencies ?? []) : nil)
    }

    func stableMoE() -> Gate<T> {
        let gates = run.gates, dimension = gates.stableDistillDimension
        let router = centroids { StableMoEPolicy<T>.key(seed: $0, layer: $1).derive(0) }
        let table = store.add(path.appending("distilled_table", role: .routingTable), rows: vocabularySize, columns: dimension, weightDecay: false,
                              initialization: .normal(standardDeviation: 0.02))
        let distilledCentroids = store.add(path.appending("distilled_centroids", role: .routingTable), rows: dimension, columns: experts, weightDecay: false,
                                           initialization: .zeros)
        let policy = StableMoEPolicy(expertCount: experts, distilledTable: table, distilledCentroids: distilledCentroids,
                                     stage2Step: Int((gates.stableStage2Fraction * Double(run.train.steps)).rounded()),
                                     capacityFactor: gates.stableCapacityFactor)
        return Gate(kind: .stablemoe, expertCount: experts, router: router, policy: policy,
                    losses: [StableBalanceLoss(coefficient: gates.stableBalance, policy: policy),
                             DistillationLoss(coefficient: gates.stableDistill, policy: policy)])
    }
}
