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
    /// First and second moments, laid out like the store's values.
    public let firstMoment: UnsafeMutablePointer<T>
    public let secondMoment: UnsafeMutablePointer<T>
    /// Updates applied to each entry so far (t in its bias corrections). Per entry, because
    /// tensors created mid-run (EvoMoE's spawned experts and fresh router) start again at 0.
    public var stepCounts: [Int]
    /// Entries the optimizer leaves alone (hash tables, StableMoE's frozen distilled router).
    public var frozen: Set<Int> = []
    public var settings: AdamWSettings

    /// Build after the model: the store must not grow afterwards.
    public init(store: ParameterStore<T, Kind>, settings: AdamWSettings) {
        self.store = store
        self.settings = settings
        firstMoment = .allocate(capacity: max(store.count, 1))
        secondMoment = .allocate(capacity: max(store.count, 1))
        firstMoment.initialize(repeating: 0, count: max(store.count, 1))
        secondMoment.initialize(repeating: 0, count: max(store.count, 1))
        stepCounts = Array(repeating: 0, count: store.entries.count)
    }

    /// The step count of every entry (they differ only after a reset).
    public var stepCount: Int { stepCounts.max() ?? 0 }

    /// Zeroes the moments and step counter of the named entries (new tensors).
    public func reset(entries names: Set<String>) {
        for (index, entry) in store.entries.enumerated() where names.contains(entry.name) {
            (firstMoment + entry.offset).update(repeating: 0, count: entry.count)
            (secondMoment + entry.offset).update(repeating: 0, count: entry.count)
            stepCounts[index] = 0
        }
    }

    public func freeze(_ name: String, _ isFrozen: Bool = true) {
        guard let index = store.entries.firstIndex(where: { $0.name == name }) else { return }
        if isFrozen { frozen.insert(index) } else { frozen.remove(index) }
    }

    deinit {
        firstMoment.deallocate()
        secondMoment.deallocate()
    }

    /// One update with the gradients already in the store, multiplied by `gradientScale`
    /// (the clipping factor).
    public func update(learningRate: Double, gradientScale: Double = 1) {
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
            AdamW.updateRange(values: store.values + entry.offset, gradients: store.gradients + entry.offset,
                              first: firstMoment + entry.offset, second: secondMoment + entry.offset, count: entry.count,
                              beta1: beta1, beta2: beta2, stepSize: stepSize, epsilon: epsilon, decay: decay,
                              gradientScale: scale)
        }
    }

    /// values, gradients, first, second: [count]. Weight decay is applied as p *= (1 - lr λ)
    /// before the Adam step, as PyTorch's AdamW does.
    static func updateRange(values: UnsafeMutablePointer<T>, gradients: UnsafePointer<T>,
                            first: UnsafeMutablePointer<T>, second: UnsafeMutablePointer<T>, count: Int,
                            beta1: T, beta2: T, stepSize: T, epsilon: T, decay: T, gradientScale: T) {
        var index = 0
        if T.self == Float.self {
            // Whole 16-lane blocks in vector code; the tail below.
            index = FloatKernels.adamWBlocks(values: asFloat(values), gradients: asFloat(gradients), first: asFloat(first),
                                             second: asFloat(second), count: count, beta1: beta1 as! Float, beta2: beta2 as! Float,
                                             stepSize: stepSize as! Float, epsilon: epsilon as! Float, decay: decay as! Float,
                                             gradientScale: gradientScale as! Float)
        }
        // The reference update, element by element (Float's tail; all of Double, for the tests).
        let oneMinusBeta1 = 1 - beta1, oneMinusBeta2 = 1 - beta2
        while index < count {
            let g = gradients[index] * gradientScale
            first[index] = first[index] * beta1 + g * oneMinusBeta1
            second[index] = second[index] * beta2 + g * g * oneMinusBeta2
            values[index] = values[index] * decay - stepSize * first[index] / (second[index].squareRoot() + epsilon)
            index += 1
        }
    }
}

@inline(__always) func _pow(_ base: Double, _ exponent: Int) -> Double { Glibc.pow(base, Double(exponent)) }
