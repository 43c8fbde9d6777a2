/// Where one training step's time went, in seconds, summed over the step (forward and
/// backward). Filled by the model, its MoE layers and the trainer; `other` is the rest
/// (embedding, the blocks' norms and residual sums, dense FFNs, the gradient norm).
public struct StepProfile: Sendable {
    public var attention = 0.0
    /// MoE stage 1: the gate's router, selection policy and auxiliary losses (forward and backward).
    public var route = 0.0
    /// MoE stage 2: sorting the assignments and the count exchange with its check.
    public var plan = 0.0
    /// MoE stage 3: gathering token rows, the all-to-all-v to the experts, regrouping (and adjoints).
    public var dispatch = 0.0
    /// MoE stage 4: the experts' GEMMs and GELUs (and EvoMoE's dense FFN before the spawn).
    public var experts = 0.0
    /// MoE stage 5: regrouping, the all-to-all-v back and the weighted combine (and adjoints).
    public var combine = 0.0
    /// The output projection: the final norm, the logits' products and the cross-entropy, with
    /// their adjoints.
    public var output = 0.0
    /// Gradient all-reduces (starting the overlapped ones too) and the trainer's other small
    /// collectives.
    public var allReduce = 0.0
    public var optimizer = 0.0
    /// Waiting for the slowest rank (load imbalance), by where: with the benchmark's WaitingProbe
    /// hook, the time in a barrier before each MoE layer's routing (its statistics all-reduce is
    /// the layer's first collective), before each forward exchange and before the gradient
    /// all-reduce; in backward (always), the time an MoE exchange still blocks after the deferred
    /// expert weight gradients have filled the wait (ExpertGradientBacklog). The stages and
    /// `allReduce` hold the work and transfers alone.
    public var waitingInForward = 0.0, waitingInBackward = 0.0, waitingForGradients = 0.0
    public var waiting: Double { waitingInForward + waitingInBackward + waitingForGradients }
    public var total = 0.0
    /// Communication of data (the expert all-to-alls, gradient all-reduces and the trainer's
    /// small collectives), counted inside the parts above as well: `totalCommunication` from each
    /// transfer's start to its completion, `exposedCommunication` the time a rank was blocked on
    /// one (equal for blocking collectives; less when a transfer overlaps computation).
    public var totalCommunication = 0.0
    public var exposedCommunication = 0.0
    /// Bytes this rank sent to other ranks in the MoE layers' exchanges (forward and backward).
    public var expertBytesSent = 0.0

    public init() {}

    /// Everything else: embedding, the blocks' norms and residual sums, dense FFNs, the
    /// gradient norm.
    public var other: Double { max(0, total - attention - moe - output - allReduce - optimizer - waiting) }
    /// The five MoE stages.
    public var moe: Double { route + plan + dispatch + experts + combine }
    /// The work outside attention and the experts, waiting left out: the MoE layers' routing,
    /// planning, exchanges and combine, the output projection, the all-reduces, the optimizer and
    /// `other` (docs/PERFORMANCE.md, "What is left between the products").
    public var outsideAttentionAndExperts: Double { route + plan + dispatch + combine + output + allReduce + optimizer + other }

    public static func += (lhs: inout StepProfile, rhs: StepProfile) {
        for part in StepProfile.summed { lhs[keyPath: part] += rhs[keyPath: part] }
    }

    static let summed: [WritableKeyPath<StepProfile, Double>] =
        [\.attention, \.route, \.plan, \.dispatch, \.experts, \.combine, \.output, \.allReduce, \.optimizer,
         \.waitingInForward, \.waitingInBackward, \.waitingForGradients, \.total,
         \.totalCommunication, \.exposedCommunication, \.expertBytesSent]

    /// Named parts, for reports.
    public var parts: [(String, Double)] {
        [("attention", attention), ("route", route), ("plan", plan), ("dispatch", dispatch), ("experts", experts),
         ("combine", combine), ("output", output), ("all_reduce", allReduce), ("optimizer", optimizer), ("waiting", waiting), ("other", other)]
    }
}
