import MoEComm

/// What one training step did, over the global batch (identical on every rank).
public struct StepReport: Sendable {
    /// The attempted step this reports (`TrainingState.attempted` before it ran).
    public var step: Int
    /// Mean cross-entropy of the global batch (nats per token), before the update.
    public var loss: Double
    /// Σ over MoE layers of the weighted auxiliary losses.
    public var auxiliaryLoss: Double
    public var learningRate: Double
    /// Global gradient norm before clipping.
    public var gradientNorm: Double
    public var moeLayers: [RoutingStatistics]
    /// Where this rank's time went.
    public var profile: StepProfile
    /// The gate's temperature at this step (dts, activation_dts).
    public var temperature: Double?
    /// The training phase: dense (EvoMoE before the spawn), soft/hard (DTS selection),
    /// stage1/stage2 (StableMoE) or sparse.
    public var phase: TrainingPhase
    /// The update was skipped: the loss or the gradient was not finite.
    public var skipped = false
}

/// Training failures every rank detects together (their inputs are global values).
public enum TrainingError: Error, CustomStringConvertible, AgreedFailure {
    case replicasDiverged(step: Int, rank: Int, checksum: String)
    case expertCopiesDiverged(step: Int, rank: Int, checksum: String)
    case nonFinite(skips: Int, firstStep: Int, location: String)
    public var description: String {
        switch self {
        case let .replicasDiverged(step, rank, checksum):
            return "replicated parameters differ between ranks after step \(step) (rank \(rank) has checksum \(checksum)); ranks are no longer training the same model"
        case let .expertCopiesDiverged(step, rank, checksum):
            return "the copies of an expert differ between ranks after step \(step) (rank \(rank) has checksum \(checksum)); the expert replicas are no longer training the same experts"
        case let .nonFinite(skips, firstStep, location):
            return "stopping: \(skips) updates in a row had a non-finite loss or gradient (first at step \(firstStep), in \(location)); the last complete checkpoint is unchanged; lower train.lr or check the data"
        }
    }
}
