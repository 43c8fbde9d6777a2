#if canImport(Glibc)
import Glibc
#endif
import MoEIO

/// Linear warm-up from lr/warmup to lr, then cosine decay to `minimum` at the last step.
///   step < W:  lr (step + 1) / W
///   else:      min + (lr - min) (1 + cos(π (step - W) / max(1, S - W))) / 2
public struct LearningRateSchedule: Sendable, Equatable {
    public var peak: Double
    public var minimum: Double
    public var warmupSteps: Int
    public var totalSteps: Int

    public init(peak: Double, minimum: Double, warmupSteps: Int, totalSteps: Int) {
        self.peak = peak
        self.minimum = minimum
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
    }

    /// The schedule of `train` (train.lr, min_lr, warmup_steps, steps).
    public init(_ train: TrainConfig) {
        self.init(peak: train.learningRate, minimum: train.minLearningRate, warmupSteps: train.warmupSteps, totalSteps: train.steps)
    }

    /// Learning rate of the update made at `step` (0-based).
    public func learningRate(at step: Int) -> Double {
        if step < warmupSteps { return peak * Double(step + 1) / Double(warmupSteps) }
        let decaySteps = max(1, totalSteps - warmupSteps)
        let progress = min(1, Double(step - warmupSteps) / Double(decaySteps))
        return minimum + (peak - minimum) * 0.5 * (1 + cos(Double.pi * progress))
    }
}
