import MoEComm
#if canImport(Glibc)
import Glibc
#endif

/// AdamW (Loshchilov & Hutter) over one parameter store:
///   m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²
///   p -= lr * ( m̂ / (sqrt(v̂) + ε) + λ p )     with m̂ = m / (1-β1^t), v̂ = v / (1-β2^t)
/// The decay term λ p is decoupled from the gradient and applied only to entries whose
/// `weightDecay` flag is set (matrices by default; not norms, biases or embeddings).
public struct AdamWSettings: Sendable {
    public var beta1: Double
    public var beta2: Double
    public var epsilon: Double
    public var weightDecay: Double

    public init(beta1: Double, beta2: Double, epsilon: Double, weightDecay: Double) {
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.weightDecay = weightDecay
    }
}

public final class AdamW<T: Scalar, Kind> {
    public let store: ParameterStore<T, Kind>
    /// The flat range of the store's values this optimizer updates and keeps moments for: all of
    /// them, or this rank's slice with a sharded optimizer (ZeRO stage 1).
    public let shard: Range<Int>
    /// First and second moments of the shard: moment i belongs to value shard.lowerBound + i.
    public let firstMoment: UnsafeMutablePointer<T>
    public let secondMoment: UnsafeMutablePointer<T>
    /// Updates applied to each entry so far (t in its bias corrections). Per entry, because
    /// tensors created mid-run (EvoMoE's spawned experts and fresh router) start again at 0.
    /// Counted for every entry on every rank, whether the shard holds part of it or not.
    public var stepCounts: [Int]
    /// Entries the optimizer leaves alone (hash tables, StableMoE's frozen distilled router).
    public var frozen: Set<Int> = []
    /// Entries whose gradients their producers overwrite with the first product of each step
    /// (the experts' weights: `MoELayer.expectOverwrittenWeightGradients`): a clearing update
    /// reads them and leaves them as they are.
    public var gradientsOverwritten: Set<Int> = []
    public var settings: AdamWSettings

    /// Build after the model: the store must not grow afterwards.
    public init(store: ParameterStore<T, Kind>, settings: AdamWSettings, shard: Range<Int>? = nil) {
        self.store = store
        self.settings = settings
        self.shard = shard ?? 0..<store.count
        precondition(self.shard.lowerBound >= 0 && self.shard.upperBound <= store.count, "the shard lies in the store")
        let count = max(self.shard.count, 1)
        firstMoment = .allocate(capacity: count)
        secondMoment = .allocate(capacity: count)
        firstMoment.initialize(repeating: 0, count: count)
        secondMoment.initialize(repeating: 0, count: count)
        stepCounts = Array(repeating: 0, count: store.entries.count)
    }

    /// Whether the moments cover only a slice of the store (ZeRO stage 1 on more than one rank).
    public var isSharded: Bool { shard.count != store.count }

    /// The part of `entry` inside the shard, as a flat range of the store (empty if none).
    func shardPart(of entry: ParameterEntry) -> Range<Int> {
        max(entry.offset, shard.lowerBound)..<max(max(entry.offset, shard.lowerBound), min(entry.offset + entry.count, shard.upperBound))
    }

    /// R contiguous slices of `count` values, as equal as possible: rank r's is slices[r].
    public static func slices(count: Int, ranks: Int) -> [Range<Int>] {
        (0..<ranks).map { ($0 * count / ranks)..<(($0 + 1) * count / ranks) }
    }

    /// The step count of every entry (they differ only after a reset).
    public var stepCount: Int { stepCounts.max() ?? 0 }

    /// Zeroes the moments and step counter of the entries at `indices` (new tensors).
    public func reset(entries indices: Set<Int>) {
        for (index, entry) in store.entries.enumerated() where indices.contains(index) {
            let part = shardPart(of: entry)
            (firstMoment + part.lowerBound - shard.lowerBound).update(repeating: 0, count: part.count)
            (secondMoment + part.lowerBound - shard.lowerBound).update(repeating: 0, count: part.count)
            stepCounts[index] = 0
        }
    }

    /// Stops (or resumes) updating the entry at `index`; an index the store does not hold is a
    /// programming error, not something to skip silently.
    public func freeze(_ index: Int, _ isFrozen: Bool = true) {
        precondition(store.entries.indices.contains(index), "AdamW.freeze: no entry \(index) in this optimizer's store")
        if isFrozen { frozen.insert(index) } else { frozen.remove(index) }
    }

    /// Stops (or resumes) updating `parameter` (a handle of this optimizer's store).
    public func freeze(_ parameter: Parameter<T, Kind>, _ isFrozen: Bool = true) {
        freeze(store.entryIndex(of: parameter), isFrozen)
    }

    deinit {
        firstMoment.deallocate()
        secondMoment.deallocate()
    }

    /// The moments of the whole store, [store.count] each (for checkpoints): the shard's own, or
    /// with a sharded optimizer every rank's slices gathered (collective over `communicator`).
    public func fullMoments(over communicator: Communicator) throws -> (first: [T], second: [T]) where T: CommElement {
        var first = [T](repeating: 0, count: store.count), second = first
        let shard = self.shard, firstMoment = self.firstMoment, secondMoment = self.secondMoment
        first.withUnsafeMutableBufferPointer { ($0.baseAddress! + shard.lowerBound).update(from: firstMoment, count: shard.count) }
        second.withUnsafeMutableBufferPointer { ($0.baseAddress! + shard.lowerBound).update(from: secondMoment, count: shard.count) }
        if shard.count != store.count {
            let blocks = AdamW.slices(count: store.count, ranks: communicator.size).map(\.count)
            try first.withUnsafeMutableBufferPointer { try communicator.allGather($0, blockCounts: blocks) }
            try second.withUnsafeMutableBufferPointer { try communicator.allGather($0, blockCounts: blocks) }
        }
        return (first, second)
    }

    /// Takes the shard's part of whole-store moments (from a checkpoint).
    public func setMoments(first: UnsafePointer<T>, second: UnsafePointer<T>) {
        firstMoment.update(from: first + shard.lowerBound, count: shard.count)
        secondMoment.update(from: second + shard.lowerBound, count: shard.count)
    }

    /// Whether `update(learningRate:gradientScale:clearingGradients:)` can leave every gradient
    /// of the store zero: it visits all of them only when no entry is frozen and the shard is the
    /// whole store (no ZeRO-1 slicing).
    public var visitsEveryGradient: Bool { frozen.isEmpty && shard.count == store.count }

    /// One update with the gradients already in the store, multiplied by `gradientScale`
    /// (the clipping factor). With `clearingGradients` the gradients it reads are zeroed as it
    /// goes (with `visitsEveryGradient`, the whole store's: the next step need not zero them).
    public func update(learningRate: Double, gradientScale: Double = 1, clearingGradients: Bool = false) {
        let beta1 = T(settings.beta1), beta2 = T(settings.beta2)
        let scale = T(gradientScale)
        for (index, entry) in store.entries.enumerated() where !frozen.contains(index) {
            stepCounts[index] += 1
            let correction1 = 1 / (1 - _pow(settings.beta1, stepCounts[index]))
            let correction2 = 1 / (1 - _pow(settings.beta2, stepCounts[index]))
            // Fold the bias corrections into the step size and epsilon:
            //   m̂ / (sqrt(v̂) + ε) = c1 m / (sqrt(c2) (sqrt(v) + ε / sqrt(c2)))
            let stepSize = T(learningRate * correction1 / correction2.squareRoot())
            let epsilon = T(settings.epsilon / correction2.squareRoot())
            let decay = entry.weightDecay ? T(1 - learningRate * settings.weightDecay) : 1
            let part = shardPart(of: entry), moment = part.lowerBound - shard.lowerBound
            guard !part.isEmpty else { continue }
            let overwritten = gradientsOverwritten.contains(index)
            let (values, rounded, gradients) = (store.values, store.bfloat16Values, store.gradients)
            let (first, second) = (firstMoment + moment, secondMoment + moment)
            // Memory-bound: in a one-process run the pinned threads share the large entries.
            BLASInfo.splitElementwise(part.count) { begin, end in
                let at = part.lowerBound + begin
                AdamW.updateRange(values: values + at, rounded: rounded.map { $0 + at }, gradients: gradients + at,
                                  first: first + begin, second: second + begin, count: end - begin,
                                  beta1: beta1, beta2: beta2, stepSize: stepSize, epsilon: epsilon, decay: decay,
                                  gradientScale: scale, clearing: clearingGradients && !overwritten)
            }
        }
    }

    /// values, gradients, first, second: [count]. Weight decay is applied as p *= (1 - lr λ)
    /// before the Adam step, as PyTorch's AdamW does. In bf16 mode `rounded` is the values' bf16
    /// copy, updated in the same pass: the copy follows the master values from update to update
    /// without a separate pass over them.
    static func updateRange(values: UnsafeMutablePointer<T>, rounded: UnsafeMutablePointer<BFloat16>? = nil, gradients: UnsafeMutablePointer<T>,
                            first: UnsafeMutablePointer<T>, second: UnsafeMutablePointer<T>, count: Int,
                            beta1: T, beta2: T, stepSize: T, epsilon: T, decay: T, gradientScale: T, clearing: Bool = false) {
        var index = 0
        if T.self == Float.self {
            // Whole 16-lane blocks in vector code; the tail below.
            index = FloatKernels.adamWBlocks(values: asFloat(values), rounded: rounded, gradients: asFloat(gradients), first: asFloat(first),
                                             second: asFloat(second), count: count, beta1: beta1 as! Float, beta2: beta2 as! Float,
                                             stepSize: stepSize as! Float, epsilon: epsilon as! Float, decay: decay as! Float,
                                             gradientScale: gradientScale as! Float, clearing: clearing)
        }
        // The reference update, element by element (Float's tail; all of Double, for the tests).
        let oneMinusBeta1 = 1 - beta1, oneMinusBeta2 = 1 - beta2
        while index < count {
            let g = gradients[index] * gradientScale
            if clearing { gradients[index] = 0 }
            first[index] = first[index] * beta1 + g * oneMinusBeta1
            second[index] = second[index] * beta2 + g * g * oneMinusBeta2
            values[index] = values[index] * decay - stepSize * first[index] / (second[index].squareRoot() + epsilon)
            rounded?[index] = BFloat16(Float(values[index]))
            index += 1
        }
    }
}

@inline(__always) func _pow(_ base: Double, _ exponent: Int) -> Double { Glibc.pow(base, Double(exponent)) }
