/// The experts' weight gradients a backward has left for later, oldest first.
///
/// Why: every exchange of an MoE layer waits for the slowest rank, and with top-k routing the
/// ranks' expert rows differ from layer to layer (docs/PERFORMANCE.md, "Waiting"). An expert's
/// weight gradients (dW2 = aᵀ dy, dW1 = xᵀ dPre) are needed only by the optimizer, so a rank
/// sends dx back first and keeps them here; whenever it would wait for a peer it runs them one
/// product at a time, and the model runs what is left after its backward. Each expert's
/// gradient is the same products whenever they run, so the results do not depend on the
/// order, bit for bit.
public final class ExpertGradientBacklog<T: Scalar> {
    private var items: [(layer: MoELayer<T>, expert: Int, projection: FeedForward<T, ExpertSharded>.Projection)] = []
    private var next = 0

    public init() {}

    /// Both weight products of `expert` (one item each, so that a wait overshoots by one
    /// product at most).
    func add(_ layer: MoELayer<T>, expert: Int) {
        for projection in FeedForward<T, ExpertSharded>.Projection.allCases { items.append((layer, expert, projection)) }
    }

    /// Runs the oldest pending item; false when there is none.
    @discardableResult
    public func runNext() -> Bool {
        guard next < items.count else { return false }
        let item = items[next]
        next += 1
        item.layer.runWeightGradient(ofExpert: item.expert, projection: item.projection)
        return true
    }

    /// Runs every pending item and empties the backlog (keeping its storage).
    public func runAll() {
        while runNext() {}
        items.removeAll(keepingCapacity: true)
        next = 0
    }
}
