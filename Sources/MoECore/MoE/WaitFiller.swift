/// Work a rank can run while it waits for a slower peer, one bounded piece at a time (the
/// MoE layers' exchanges and the benchmark's barriers poll the transfer between pieces).
public protocol WaitFiller: AnyObject {
    /// Runs the next piece; false when there is none.
    func runNext() -> Bool
}
