#if canImport(Glibc)
import Glibc
#endif
import MoEIO

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
        /// As `kill`, once per run directory (a marker file remembers it): a restarted job
        /// passes the same arguments and must not be killed again (launch/train.sh's RESTARTS).
        case killOnce = "kill-once"
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

    /// Whether the fault acts at `step` (any step when it names none).
    func isDue(_ kind: Kind, step: Int) -> Bool { self.kind == kind && (self.step == nil || self.step == step) }
}

/// The faults aimed at this rank, acting at their points of the run (`TrainingHooks`).
public final class FaultInjector: TrainingHooks {
    let faults: [FaultInjection]
    /// Where `kill-once` leaves its marker (the run directory).
    let markerDirectory: String

    /// Keeps the faults of `faults` that target `rank`.
    public init(_ faults: [FaultInjection], rank: Int, runDirectory: String = ".") {
        self.faults = faults.filter { $0.rank == rank }
        markerDirectory = runDirectory
    }

    public var dispatchCountError: Int64 { faults.contains { $0.kind == .dispatchCount } ? 1 : 0 }

    public func reached(_ point: HookPoint, step: Int) throws {
        switch point {
        case let .readingData(path):
            if due(.dataUnreadable, step) { throw TokenFile.ReadError.unreadable(path: path) }
        case .betweenForwardAndBackward:
            if due(.sleep, step) { Glibc.sleep(3600) }
            if due(.kill, step) { raise(SIGKILL) }
            if due(.killOnce, step) {
                let marker = "\(markerDirectory)/.fault-kill-once-\(step)"
                if access(marker, F_OK) != 0 {
                    close(open(marker, O_CREAT | O_WRONLY, 0o644))
                    raise(SIGKILL)
                }
            }
        case let .gradientsReady(gradients):
            if due(.nanGradient, step) { gradients[0] = .nan }
        case .writingShard: if due(.killDuringSave, step) { raise(SIGKILL) }
        case .manifestWritten: if due(.killBeforeDone, step) { raise(SIGKILL) }
        case .pruning: if due(.killDuringPrune, step) { raise(SIGKILL) }
        }
    }

    private func due(_ kind: FaultInjection.Kind, _ step: Int) -> Bool { faults.contains { $0.isDue(kind, step: step) } }
}
