/// The counters a run carries from step to step and through a checkpoint. Two clocks, named
/// apart because a skipped update (non-finite loss or gradient) advances one and not the other:
/// `attempted` picks the data and the learning rate and schedules EvoMoE's spawn; `applied`
/// drives every gate schedule (DTS temperature, StableMoE's stages and freezing).
public struct TrainingState: Equatable, Sendable {
    /// Steps attempted so far: the index of the next step.
    public var attempted = 0
    /// Attempted steps whose update was skipped.
    public var skipped = 0
    /// Model FLOPs spent on training steps so far, over all ranks (`GPTModel.trainingFlops`, with
    /// the experts each step's gates actually kept), and the seconds those steps took. A skipped
    /// update still spent its forward and backward. Equal-compute comparisons read the first.
    public var trainingFlops = 0.0
    public var trainingSeconds = 0.0

    public init(attempted: Int = 0, skipped: Int = 0, trainingFlops: Double = 0, trainingSeconds: Double = 0) {
        self.attempted = attempted
        self.skipped = skipped
        self.trainingFlops = trainingFlops
        self.trainingSeconds = trainingSeconds
    }

    /// Updates applied so far.
    public var applied: Int { attempted - skipped }
}
