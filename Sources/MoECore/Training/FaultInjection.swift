#if canImport(Glibc)
import Glibc
#endif

/// Deliberate faults for testing failure handling end to end (`moe train --inject-fault`,
/// hidden from the help). Written `KIND@RANK` or `KIND@RANK:STEP`, e.g. `dispatch-count@1` or
/// `kill-during-save@1:10`.
public struct FaultInjection: Equatable, Sendable {
    public enum Kind: String, CaseIterable, Sendable {
        /// Announce one row more than routed in every MoE layer's dispatch.
        case dispatchCount = "dispatch-count"
        /// SIGKILL this rank while it writes the checkpoint of STEP (its shard half written).
        case killDuringSave = "kill-during-save"
        /// SIGKILL rank 0 after it wrote the manifest of STEP's checkpoint and before DONE.
        case killBeforeDone = "kill-before-done"
        /// SIGKILL rank 0 while it prunes old checkpoints after saving STEP (one file of the
        /// oldest checkpoint removed, the rest still there).
        case killDuringPrune = "kill-during-prune"
        /// SIGKILL this rank in the middle of step STEP (between forward and backward).
        case kill
        /// This rank stops for an hour in the middle of step STEP (a hung node).
        case sleep
        /// This rank's gradient gets a NaN at step STEP (before the all-reduce).
        case nanGradient = "nan-gradient"
        /// This rank cannot read its training data.
        case dataUnreadable = "data-unreadable"
    }

    public var kind: Kind
    public var rank: Int
    public var step: Int?

    public init(kind: Kind, rank: Int, step: Int? = nil) {
        self.kind = kind
        self.rank = rank
        self.step = step
    }

    public init?(_ text: String) {
        let parts = text.split(separator: "@")
        guard parts.count == 2, let kind = Kind(rawValue: String(parts[0])) else { return nil }
        let target = parts[1].split(separator: ":")
        guard let rank = Int(target[0]), rank >= 0, target.count <= 2 else { return nil }
        var step: Int?
        if target.count == 2 { guard let value = Int(target[1]), value >= 0 else { return nil }; step = value }
        self.init(kind: kind, rank: rank, step: step)
    }

    /// Arms the fault on `trainer` if it runs on the targeted rank.
    public func arm(_ trainer: Trainer) {
        guard trainer.communicator.rank == rank else { return }
        switch kind {
        case .dispatchCount: for layer in trainer.model.moeLayers { layer.injectedCountError = 1 }
        case .killDuringSave, .killBeforeDone, .killDuringPrune, .kill, .sleep, .nanGradient: trainer.faults.append(self)
        case .dataUnreadable: break   // acted on while the run reads its data
        }
    }

    static func due(_ kind: Kind, faults: [FaultInjection], step: Int) -> Bool {
        faults.contains { $0.kind == kind && ($0.step == nil || $0.step == step) }
    }

    /// Called at the fault's point of action: kills or stalls the process when it is due.
    static func trigger(_ kind: Kind, faults: [FaultInjection], step: Int) {
        guard due(kind, faults: faults, step: step) else { return }
        if kind == .sleep { Glibc.sleep(3600) } else { raise(SIGKILL) }
    }
}
