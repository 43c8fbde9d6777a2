/// Deliberate faults for testing failure handling end to end (`moe train --inject-fault`,
/// hidden from the help). Written `KIND@RANK`, e.g. `dispatch-count@1`.
public struct FaultInjection: Equatable, Sendable {
    public enum Kind: String, CaseIterable, Sendable {
        /// Announce one row more than routed in every MoE layer's dispatch.
        case dispatchCount = "dispatch-count"
    }

    public var kind: Kind
    public var rank: Int

    public init(kind: Kind, rank: Int) {
        self.kind = kind
        self.rank = rank
    }

    public init?(_ text: String) {
        let parts = text.split(separator: "@")
        guard parts.count == 2, let kind = Kind(rawValue: String(parts[0])), let rank = Int(parts[1]), rank >= 0 else { return nil }
        self.init(kind: kind, rank: rank)
    }

    /// Arms the fault on `trainer` if it runs on the targeted rank.
    public func arm(_ trainer: Trainer) {
        guard trainer.communicator.rank == rank else { return }
        switch kind {
        case .dispatchCount: for layer in trainer.model.moeLayers { layer.injectedCountError = 1 }
        }
    }
}
