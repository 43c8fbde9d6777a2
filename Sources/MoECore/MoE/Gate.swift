import MoEIO
import MoEComm

/// Scores only: logits [N, E] from the tokens' vectors, and their adjoint
/// (docs/ARCHITECTURE.md, "Gates").
public protocol Router<Element>: AnyObject {
    associatedtype Element: Scalar
    var expertCount: Int { get }
    /// logits [rows, E] = f(x), x [rows, C].
    func forward(_ x: UnsafePointer<Element>, rows: Int, context: RoutingContext, into logits: Tensor<Element>)
    /// Accumulates the router's parameter gradients and adds its contribution to dx.
    func backward(_ x: UnsafePointer<Element>, rows: Int, dLogits: UnsafePointer<Element>, dx: UnsafeMutablePointer<Element>)
    /// Fills parameters a plain random initialisation cannot (orthogonal centroids), keyed by
    /// seed and layer only.
    func initializeState(seed: Int, layer: Int)
}

extension Router {
    public func initializeState(seed: Int, layer: Int) {}
}

/// Which experts process which tokens, with what weights: top-k with capacity, a threshold,
/// a balanced assignment, expert choice or a table lookup.
public protocol SelectionPolicy<Element>: AnyObject {
    associatedtype Element: Scalar
    /// Appends the kept assignments to `routing` (token order, then choice order); a policy that
    /// drops also fills `routing.selectedPerExpert`. May run collectives (global-order capacity).
    func select(_ scores: RouterScores<Element>, rows: Int, context: RoutingContext, into routing: Routing<Element>) throws
    /// dLogits += (∂w/∂l)ᵀ dWeights, dWeights per kept assignment in `routing`'s order.
    func backward(_ dWeights: UnsafePointer<Element>, routing: Routing<Element>, scores: RouterScores<Element>,
                  into dLogits: Tensor<Element>)
    /// Policy-owned parameters a plain random initialisation cannot fill (hash tables).
    func initializeState(seed: Int, layer: Int)
    /// Whether the selection drops assignments (capacity); the others keep all they select.
    var drops: Bool { get }
    func phase(step: Int) -> TrainingPhase
    /// The temperature at update `step`, for policies that have one (logged and checkpointed).
    func temperature(step: Int) -> Double?
    /// Parameters the trainer freezes or thaws at `step` (StableMoE's distilled router).
    func frozenParameters(step: Int) -> [(parameter: Parameter<Element, Replicated>, frozen: Bool)]
    /// After an applied update, from this layer's global statistics of the step (loss-free
    /// balancing's bias).
    func adapt(to statistics: RoutingStatistics)
    /// State outside the parameters, saved in checkpoints.
    var state: [String: Double] { get set }
}

extension SelectionPolicy {
    public func initializeState(seed: Int, layer: Int) {}
    public var drops: Bool { false }
    public func phase(step: Int) -> TrainingPhase { .sparse }
    public func temperature(step: Int) -> Double? { nil }
    public func frozenParameters(step: Int) -> [(parameter: Parameter<Element, Replicated>, frozen: Bool)] { [] }
    public func adapt(to statistics: RoutingStatistics) {}
    public var state: [String: Double] {
        get { [:] }
        set {}
    }
}

/// What an auxiliary loss reads: this forward's scores and routing.
public struct LossInput<T: Scalar> {
    public let scores: RouterScores<T>
    public let routing: Routing<T>
    public let rows: Int
    var tokens: Double { Double(routing.statistics.globalTokens) }
    /// Scale of the loss's gradient (1/A with A micro-batches per step).
    var weight: Double { routing.lossWeight }
}

/// A small differentiable term added to the training loss. Its value needs sums over the global
/// batch: `accumulate` adds this rank's share to `sumCount` slots, the gate all-reduces all
/// parts' slots at once, then `value` reads the global sums.
public protocol AuxiliaryLoss<Element>: AnyObject {
    associatedtype Element: Scalar
    var sumCount: Int { get }
    func accumulate(_ input: LossInput<Element>, into sums: UnsafeMutablePointer<Double>)
    /// The weighted loss from the global sums; keeps what `backward` needs.
    func value(_ input: LossInput<Element>, sums: UnsafePointer<Double>) -> Double
    /// Adds the loss's gradient to dWeights (per kept assignment) or to dLogits [N, E].
    func backward(_ input: LossInput<Element>, dWeights: UnsafeMutablePointer<Element>, dLogits: Tensor<Element>)
    /// A controller's update after each optimizer step (ReLU routing's λ), from every MoE layer's
    /// statistics of that step.
    func adapt(to layers: [RoutingStatistics])
    /// State outside the parameters, saved in checkpoints.
    var state: [String: Double] { get set }
}

extension AuxiliaryLoss {
    public var sumCount: Int { 0 }
    public func accumulate(_ input: LossInput<Element>, into sums: UnsafeMutablePointer<Double>) {}
    public func adapt(to layers: [RoutingStatistics]) {}
    public var state: [String: Double] {
        get { [:] }
        set {}
    }
}

/// The phase a step trains in: EvoMoE's dense phase (decided by the recipe), DTS's soft and hard
/// selection, StableMoE's two stages, or plain sparse routing.
public enum TrainingPhase: String, Codable, Sendable {
    case dense, soft, hard, stage1, stage2, sparse
}

/// A gate: a router, a selection policy and a list of auxiliary losses (docs/ARCHITECTURE.md).
///
/// Forward: logits = router(x); routing = policy(logits); then one all-reduce of the sums the
/// statistics and the losses need. Backward runs the adjoints in reverse: losses (into dWeights
/// or dLogits), the policy (dWeights -> dLogits), the router (dLogits -> dx and its parameters).
public final class Gate<T: Scalar> {
    public let kind: GateKind
    /// nil for hash routing, whose table lookup needs no scores.
    public let router: (any Router<T>)?
    public let policy: any SelectionPolicy<T>
    public let losses: [any AuxiliaryLoss<T>]
    public let expertCount: Int
    public let scores = RouterScores<T>()
    let sums = GlobalSums()
    let dLogits = Tensor<T>()

    public init(kind: GateKind, expertCount: Int, router: (any Router<T>)?, policy: any SelectionPolicy<T>,
                losses: [any AuxiliaryLoss<T>] = []) {
        precondition(router == nil || router!.expertCount == expertCount, "the router scores every expert")
        self.kind = kind
        self.expertCount = expertCount
        self.router = router
        self.policy = policy
        self.losses = losses
    }

    public func forward(_ x: UnsafePointer<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        routing.reset(expertCount: expertCount, context: context)
        scores.hasProbabilities = false
        scores.logits.resize(rows: rows, columns: expertCount)
        router?.forward(x, rows: rows, context: context, into: scores.logits)
        try policy.select(scores, rows: rows, context: context, into: routing)
        try summarize(rows: rows, routing: routing, communicator: context.communicator)
    }

    /// Sum slots: kept [E], selected [E], first choices [E], entropy [1], then each loss's.
    private func summarize(rows: Int, routing: Routing<T>, communicator: Communicator) throws {
        let experts = expertCount, input = LossInput(scores: scores, routing: routing, rows: rows)
        sums.reset(count: 3 * experts + 1 + losses.reduce(0) { $0 + $1.sumCount })
        for e in routing.experts { sums[Int(e)] += 1 }
        for e in 0..<experts {
            sums[experts + e] = policy.drops ? Double(routing.selectedPerExpert[e]) : sums[e]
            sums[2 * experts + e] = Double(routing.firstChoicesPerExpert[e])
        }
        if scores.hasProbabilities { sums[3 * experts] = Kernels.entropySum(scores.probabilities.pointer, rows: rows, columns: experts) }
        var offset = 3 * experts + 1
        for loss in losses {
            sums.withSlots(from: offset) { loss.accumulate(input, into: $0) }
            offset += loss.sumCount
        }
        try sums.allReduce(communicator)
        for e in 0..<experts {
            routing.statistics.keptPerExpert[e] = Int64(sums[e])
            routing.statistics.selectedPerExpert[e] = Int64(sums[experts + e])
            routing.globalSelectedPerExpert[e] = Int64(sums[experts + e])
            routing.globalFirstChoicesPerExpert[e] = Int64(sums[2 * experts + e])
        }
        routing.statistics.keptCount = routing.statistics.keptPerExpert.reduce(0, +)
        routing.statistics.selectedCount = routing.globalSelectedPerExpert.reduce(0, +)
        if scores.hasProbabilities { routing.statistics.routerEntropy = sums[3 * experts] / input.tokens }
        offset = 3 * experts + 1
        for loss in losses {
            routing.statistics.auxiliaryLoss += sums.withSlots(from: offset) { loss.value(input, sums: UnsafePointer($0)) }
            offset += loss.sumCount
        }
    }

    /// dWeights is scratch: the losses add their terms to it.
    public func backward(_ x: UnsafePointer<T>, rows: Int, dWeights: UnsafeMutablePointer<T>,
                         dx: UnsafeMutablePointer<T>, routing: Routing<T>) {
        dLogits.resize(rows: rows, columns: expertCount, zero: true)
        let input = LossInput(scores: scores, routing: routing, rows: rows)
        for loss in losses { loss.backward(input, dWeights: dWeights, dLogits: dLogits) }
        policy.backward(dWeights, routing: routing, scores: scores, into: dLogits)
        router?.backward(x, rows: rows, dLogits: dLogits.pointer, dx: dx)
    }

    // MARK: lifecycle (the trainer calls these; it never needs to know the gate's kind)

    public func initializeState(seed: Int, layer: Int) {
        router?.initializeState(seed: seed, layer: layer)
        policy.initializeState(seed: seed, layer: layer)
    }

    public func phase(step: Int) -> TrainingPhase { policy.phase(step: step) }
    public func temperature(step: Int) -> Double? { policy.temperature(step: step) }
    public func frozenParameters(step: Int) -> [(parameter: Parameter<T, Replicated>, frozen: Bool)] {
        policy.frozenParameters(step: step)
    }

    /// After a step: the losses' controllers (from every MoE layer's statistics), and after an
    /// applied update the policy's (from this layer's, `own` in `layers`).
    public func adapt(to layers: [RoutingStatistics], own: Int, applied: Bool) {
        for loss in losses { loss.adapt(to: layers) }
        if applied && layers.indices.contains(own) { policy.adapt(to: layers[own]) }
    }

    /// Loss-free balancing's bias per expert (nil for gates without one).
    public var selectionBias: [Double]? {
        let state = policy.state
        guard state["bias.0"] != nil else { return nil }
        return (0..<expertCount).map { state["bias.\($0)"] ?? 0 }
    }

    /// Scalar state that evolves outside the parameters (ReLU routing's λ, loss-free balancing's
    /// bias); checkpointed.
    public var state: [String: Double] {
        get { losses.reduce(into: policy.state) { merged, loss in merged.merge(loss.state) { first, _ in first } } }
        set {
            for loss in losses { loss.state = newValue }
            policy.state = newValue
        }
    }
}
