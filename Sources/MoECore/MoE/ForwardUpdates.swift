/// Where the forward is, as the parameters it is about to read: `applyUpdates(before:)` makes
/// every parameter read up to there current.
public enum ForwardPosition: Comparable {
    /// The embeddings (and a tied output head).
    case embeddings
    /// Block `block`'s replicated parameters: norms, attention, router, dense or shared FFNs.
    case block(Int)
    /// Block `block`'s routed experts (this rank's).
    case experts(ofBlock: Int)
    /// The final norm and an untied output head.
    case end

    /// Reading order: block l's replicated parameters, then its experts, then block l + 1's.
    private var readingOrder: Int {
        switch self {
        case .embeddings: 0
        case let .block(block): 2 * block + 1
        case let .experts(block): 2 * block + 2
        case .end: Int.max
        }
    }

    public static func < (left: ForwardPosition, right: ForwardPosition) -> Bool { left.readingOrder < right.readingOrder }
}

/// Parameter updates the model's forward applies as it goes (`DeferredUpdate`): no parameter is
/// read before its update, and a rank waiting for a peer applies the next ones (`WaitFiller`).
public protocol ForwardUpdates: WaitFiller {
    /// Applies the pending updates of every parameter read up to and including `position`.
    func applyUpdates(before position: ForwardPosition)
}
