import MoEComm

/// Where a test or a benchmark reaches into the training path. Production runs have no hooks
/// (nil), and every call site costs one optional check. Two implementations: the fault injector
/// (Training/FaultInjection.swift) and the benchmark's waiting probe (Training/Benchmark.swift).
/// Declared here, in the lowest folder that calls it (the MoE exchange).
public protocol TrainingHooks: AnyObject {
    /// Rows added to this rank's first send count in each dispatch, so that a test can prove a
    /// dispatch whose counts disagree with the routing is caught (0 normally).
    var dispatchCountError: Int64 { get }
    /// Called before each exchange over `communicator` and before the gradient all-reduce;
    /// returns the seconds it spent waiting for the slowest rank (the benchmark times a barrier
    /// there, so that `StepProfile.waiting` holds the imbalance and the transfers their own time).
    func waitForSlowestRank(_ communicator: Communicator) throws -> Double
    /// A named point of a step, a checkpoint save or the start-up was reached (the fault injector
    /// kills, stalls, poisons a gradient or fails a read there).
    func reached(_ point: HookPoint, step: Int) throws
}

public extension TrainingHooks {
    var dispatchCountError: Int64 { 0 }
    func waitForSlowestRank(_ communicator: Communicator) throws -> Double { 0 }
    func reached(_ point: HookPoint, step: Int) throws {}
}

/// The points `TrainingHooks.reached` is called at, in the order a run passes them.
public enum HookPoint {
    /// Reading the training data (`path`: the first training file).
    case readingData(path: String)
    /// Between a micro-batch's forward and its backward.
    case betweenForwardAndBackward
    /// The step's gradients are complete on this rank, before they are summed over ranks.
    case gradientsReady(UnsafeMutablePointer<Float>)
    /// A checkpoint save: this rank's expert shard is half written.
    case writingShard
    /// A checkpoint save: rank 0 wrote the manifest, not yet DONE.
    case manifestWritten
    /// A checkpoint save: rank 0 removed one file of the oldest checkpoint it prunes.
    case pruning
}
