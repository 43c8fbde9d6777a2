/// The non-finite policy: an update whose loss or gradient norm is not finite is skipped (both
/// are global values, so every rank takes the same branch); more than `limit` in a row stop the
/// run, naming the step and the place the first of them appeared (`train.max_consecutive_skips`).
struct NonFiniteGuard {
    let limit: Int
    private(set) var consecutive = 0
    private var first: (step: Int, location: String)?

    init(limit: Int) { self.limit = limit }

    /// Whether step `step` may apply its update; `locate` names where a non-finite value is
    /// (called for the first of a run of skips only).
    mutating func admits(lossSum: Double, gradientNorm: Double, step: Int, locate: () -> String) throws -> Bool {
        guard !lossSum.isFinite || !gradientNorm.isFinite else {
            consecutive = 0
            return true
        }
        consecutive += 1
        if consecutive == 1 { first = (step, locate()) }
        if consecutive > limit {
            throw TrainingError.nonFinite(skips: consecutive, firstStep: first?.step ?? step, location: first?.location ?? "?")
        }
        return false
    }

    /// Where the first non-finite value is: the first block whose output is not finite, else
    /// the loss, else the first parameter whose gradient is not.
    static func locate(in model: GPTModel<Float>, loss: Double, rank: Int) -> String {
        if let block = model.firstNonFiniteActivation() { return block }
        if !loss.isFinite { return "the loss" }
        for entry in model.replicated.entries where !Kernels.isFinite(model.replicated.gradients + entry.offset, count: entry.count) {
            return "the gradient of \(entry.name)"
        }
        for entry in model.experts.entries where !Kernels.isFinite(model.experts.gradients + entry.offset, count: entry.count) {
            return "the gradient of \(entry.name) (rank \(rank))"
        }
        return "an expert on another rank"
    }
}
