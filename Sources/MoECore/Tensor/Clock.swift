#if canImport(Glibc)
import Glibc
#endif

/// Monotonic time for the step profile (about 20 ns per reading, no allocation).
public enum Clock {
    @inline(__always) public static func nanoseconds() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }

    /// Runs `body`, adding its duration in seconds to `total`.
    @inline(__always) public static func measure<R>(_ total: inout Double, _ body: () throws -> R) rethrows -> R {
        let start = nanoseconds()
        defer { total += Double(nanoseconds() - start) * 1e-9 }
        return try body()
    }
}

/// Where one training step's time went, in seconds, summed over the step (forward and
/// backward). Filled by the model, its MoE layers and the trainer; `other` is the rest
/// (embedding, norms, dense FFNs, the output projection, the loss).
public struct StepProfile: Sendable {
    public var attention = 0.0
    /// Router logits, top-k, capacity, aux losses (forward and backward).
    public var gate = 0.0
    /// The count exchange and the all-to-all-v of token rows, both directions.
    public var dispatch = 0.0
    /// The experts' GEMMs and GELUs.
    public var experts = 0.0
    /// Gathering rows, regrouping them by expert and the weighted combine (and their adjoints).
    public var combine = 0.0
    /// Gradient all-reduces and the other small collectives of the trainer.
    public var allReduce = 0.0
    public var optimizer = 0.0
    /// With `Trainer.separateWaiting`: time spent in a barrier before each exchange and
    /// all-reduce, i.e. waiting for the slowest rank (load imbalance), so that `dispatch` and
    /// `allReduce` are the transfers alone.
    public var waiting = 0.0
    public var total = 0.0

    public init() {}

    public var other: Double { max(0, total - attention - gate - dispatch - experts - combine - allReduce - optimizer - waiting) }

    public static func += (lhs: inout StepProfile, rhs: StepProfile) {
        lhs.attention += rhs.attention; lhs.gate += rhs.gate; lhs.dispatch += rhs.dispatch; lhs.experts += rhs.experts
        lhs.combine += rhs.combine; lhs.allReduce += rhs.allReduce; lhs.optimizer += rhs.optimizer; lhs.total += rhs.total
        lhs.waiting += rhs.waiting
    }

    /// Named parts, for reports.
    public var parts: [(String, Double)] {
        [("attention", attention), ("gate", gate), ("dispatch", dispatch), ("experts", experts), ("combine", combine),
         ("all_reduce", allReduce), ("optimizer", optimizer), ("waiting", waiting), ("other", other)]
    }
}
