import MoEComm

/// What a gate decided for one MoE layer on this rank: the assignments that survive capacity,
/// in token order (then choice order), plus statistics over the global batch.
public final class Routing<T: Scalar> {
    /// Kept assignment j sends token `tokens[j]` to global expert `experts[j]` with combine
    /// weight `weights[j]`.
    public internal(set) var tokens: [Int32] = []
    public internal(set) var experts: [Int32] = []
    public internal(set) var weights: [T] = []

    /// Weighted auxiliary loss this layer adds to the training loss (global value).
    public internal(set) var auxiliaryLoss = 0.0
    /// Kept assignments per expert over the global batch (what each expert processed).
    public internal(set) var keptPerExpert: [Int64] = []
    /// Assignments the gate selected (before capacity) and kept, over the global batch.
    public internal(set) var selectedCount: Int64 = 0
    public internal(set) var keptCount: Int64 = 0
    public internal(set) var globalTokens = 0
    /// Mean entropy of the router's probabilities over the global batch, when the gate has them.
    public internal(set) var routerEntropy: Double?

    public init() {}

    public var count: Int { tokens.count }

    func reset(expertCount: Int) {
        tokens.removeAll(keepingCapacity: true)
        experts.removeAll(keepingCapacity: true)
        weights.removeAll(keepingCapacity: true)
        if keptPerExpert.count != expertCount { keptPerExpert = Array(repeating: 0, count: expertCount) }
        auxiliaryLoss = 0
        routerEntropy = nil
        selectedCount = 0
        keptCount = 0
    }

    /// For dropless gates with one assignment per token: the global count of each expert (all
    /// kept) from the assignments already appended. Collective.
    func recordGlobalCounts(communicator: Communicator) throws {
        for e in keptPerExpert.indices { keptPerExpert[e] = 0 }
        for e in experts { keptPerExpert[Int(e)] += 1 }
        try communicator.allReduce(&keptPerExpert)
        selectedCount = keptPerExpert.reduce(0, +)
        keptCount = selectedCount
    }

    func append(token: Int, expert: Int, weight: T) {
        tokens.append(Int32(token))
        experts.append(Int32(expert))
        weights.append(weight)
    }
}

/// Everything a gate may need besides the token vectors.
public struct RoutingContext {
    public var training: Bool
    public var communicator: Communicator
    /// Tokens in the global batch (all ranks): capacities and loss normalisers use it.
    public var globalTokens: Int
    /// Global index of this rank's first token, so noise keyed by token is rank-invariant.
    public var firstGlobalToken: Int
    /// Input token ids [N] (hash routing needs them).
    public var tokenIds: UnsafePointer<Int32>?
    /// Key for this layer's random draws at this step.
    public var noiseKey: RandomKey
    /// Completed optimizer updates t (schedules such as the DTS temperature read it).
    public var step: Int

    public init(training: Bool, communicator: Communicator, globalTokens: Int, firstGlobalToken: Int,
                tokenIds: UnsafePointer<Int32>?, noiseKey: RandomKey, step: Int = 0) {
        self.step = step
        self.training = training
        self.communicator = communicator
        self.globalTokens = globalTokens
        self.firstGlobalToken = firstGlobalToken
        self.tokenIds = tokenIds
        self.noiseKey = noiseKey
    }
}

/// A router: decides which experts process which tokens, and with what weights.
///
/// `forward` fills `routing`; `backward` receives dL/dweight for every kept assignment (same
/// order as `routing`), adds the auxiliary losses' gradients, accumulates the router's
/// parameter gradients and adds the router's contribution to dx.
public protocol Gate<Element>: AnyObject {
    associatedtype Element: Scalar
    var expertCount: Int { get }
    func forward(_ x: UnsafePointer<Element>, rows: Int, context: RoutingContext, into routing: Routing<Element>) throws
    func backward(_ x: UnsafePointer<Element>, rows: Int, dWeights: UnsafePointer<Element>,
                  dx: UnsafeMutablePointer<Element>, routing: Routing<Element>)
    /// Fills parameters a plain random initialisation cannot (hash tables, orthogonal
    /// centroids), after the store's own initialisation. Keyed by seed and layer only.
    func initializeState(seed: Int, layer: Int)
    /// The gate's temperature at update `step`, for gates that have one (logged).
    func temperature(step: Int) -> Double?
    /// Scalar state that evolves during training outside the parameters (ReLU routing's λ);
    /// saved in checkpoints and restored on resume.
    var state: [String: Double] { get set }
}

extension Gate {
    public func initializeState(seed: Int, layer: Int) {}
    public func temperature(step: Int) -> Double? { nil }
    public var state: [String: Double] {
        get { [:] }
        set {}
    }
}
