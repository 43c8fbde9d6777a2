/// One step's AdamW update, left for the next forward to apply (`Trainer.defersUpdates`).
///
/// The forward asks for the parameters it is about to read (`applyUpdates(before:)`), and a
/// rank that waits for a slower peer in an MoE exchange applies the next parameters in the
/// order the forward reads them (`runNext`): the update that was a pass over all parameters
/// between two steps, with both ranks' memory traffic at once, runs in part in the waits the
/// experts' load imbalance leaves (docs/PERFORMANCE.md). Every entry gets the update AdamW would
/// have given it at the end of the step (`AdamW.schedule`), so the values are bitwise the same;
/// only the moment they are written moves, and never past the first read.
public final class DeferredUpdate: ForwardUpdates {
    let replicated: AdamW<Float, Replicated>
    let experts: AdamW<Float, ExpertSharded>
    /// Every entry of both stores in the order the forward reads them.
    private let order: [(position: ForwardPosition, isExpert: Bool, entry: Int)]
    /// Entries of `order` before `next` have had their update applied (or had none).
    private var next: Int
    /// Seconds spent applying updates since the last `takeSeconds()`.
    private var seconds = 0.0

    public init(replicated: AdamW<Float, Replicated>, experts: AdamW<Float, ExpertSharded>) {
        self.replicated = replicated
        self.experts = experts
        // Entries without a block before the first block's are the embeddings; after, the end.
        let firstBlockEntry = replicated.store.entries.firstIndex { $0.block != nil } ?? replicated.store.entries.count
        var order = replicated.store.entries.enumerated().map { index, entry -> (ForwardPosition, Bool, Int) in
            let position: ForwardPosition = entry.block.map { .block($0) } ?? (index < firstBlockEntry ? .embeddings : .end)
            return (position, false, index)
        }
        order += experts.store.entries.enumerated().map { index, entry in
            precondition(entry.block != nil, "every expert parameter belongs to a block")
            return (.experts(ofBlock: entry.block!), true, index)
        }
        // Stable: within a position, the stores' own order.
        self.order = order.enumerated().sorted { ($0.element.0, $0.offset) < ($1.element.0, $1.offset) }.map(\.element)
        next = self.order.count
    }

    /// Whether some parameter's update is still to be applied.
    public var isPending: Bool { next < order.count }

    /// Schedules both optimizers' update (`AdamW.schedule`), applied by the calls below. The
    /// previous one must be complete.
    public func schedule(learningRate: Double, gradientScale: Double, clearingGradients: Bool) {
        precondition(!isPending, "an update is scheduled before the previous one was applied")
        replicated.schedule(learningRate: learningRate, gradientScale: gradientScale, clearingGradients: clearingGradients)
        experts.schedule(learningRate: learningRate, gradientScale: gradientScale, clearingGradients: clearingGradients)
        next = 0
    }

    /// Applies the updates of every parameter read up to and including `position`.
    public func applyUpdates(before position: ForwardPosition) {
        while next < order.count && order[next].position <= position { _ = runNext() }
    }

    /// Applies whatever is left.
    public func applyAll() { applyUpdates(before: .end) }

    public func runNext() -> Bool {
        guard next < order.count else { return false }
        let (_, isExpert, entry) = order[next]
        next += 1
        Clock.measure(&seconds) {
            if isExpert { experts.applyScheduled(entry: entry) } else { replicated.applyScheduled(entry: entry) }
        }
        return true
    }

    /// Seconds spent applying updates since the previous call (the step profile's optimizer part).
    public func takeSeconds() -> Double {
        defer { seconds = 0 }
        return seconds
    }
}
