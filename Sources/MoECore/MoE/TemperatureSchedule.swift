import MoEIO
#if canImport(Glibc)
import Glibc
#endif

/// The temperature schedule of the Dense-To-Sparse gates (docs/ALGORITHMS.md 4.2). n counts
/// updates since the experts were spawned (t - T_s).
public struct TemperatureSchedule: Sendable, Equatable {
    public var kind: TemperatureScheduleKind
    public var maximum: Double
    public var minimum: Double
    /// D: updates over which τ falls from `maximum` to `minimum`.
    public var annealSteps: Int
    /// H: from this n on, selection is hard top-1 (nil: never).
    public var hardStep: Int?
    /// T_s: the update at which the DTS clock starts.
    public var startStep: Int

    public init(kind: TemperatureScheduleKind, maximum: Double, minimum: Double, annealSteps: Int, hardStep: Int?, startStep: Int) {
        self.kind = kind
        self.maximum = maximum
        self.minimum = minimum
        self.annealSteps = max(1, annealSteps)
        self.hardStep = hardStep
        self.startStep = startStep
    }

    public func clock(_ step: Int) -> Int { max(0, step - startStep) }

    public func temperature(step: Int) -> Double {
        let n = Double(clock(step))
        switch kind {
        case .linear: return max(maximum - n * (maximum - minimum) / Double(annealSteps), minimum)
        case .exp: return max(maximum * Glibc.pow(minimum / maximum, n / Double(annealSteps)), minimum)
        case .constant: return maximum
        }
    }

    public func isHard(step: Int) -> Bool { hardStep.map { clock(step) >= $0 } ?? false }
}
