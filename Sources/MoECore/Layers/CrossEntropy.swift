/// Softmax cross-entropy over the vocabulary, fused with its backward (llm.c's layout).
/// logits: [N, V], targets: [N].
public enum CrossEntropy {
    /// Replaces logits by probabilities and returns the summed loss Σ -log p[target] (in Double,
    /// so the sum over many tokens does not lose precision).
    public static func forward<T: Scalar>(logits: UnsafeMutablePointer<T>, targets: UnsafePointer<Int32>,
                                          rows: Int, vocabularySize: Int) -> Double {
        var total = 0.0
        for row in 0..<rows {
            let values = logits + row * vocabularySize
            let target = Int(targets[row])
            let targetLogit = values[target]
            let logSumExp = Kernels.softmaxRow(values, count: vocabularySize)
            total += Double(logSumExp - targetLogit)
        }
        return total
    }

    /// Turns probabilities into dLogits = scale * (p - onehot(target)), in place.
    public static func backward<T: Scalar>(probabilities: UnsafeMutablePointer<T>, targets: UnsafePointer<Int32>,
                                           rows: Int, vocabularySize: Int, scale: T) {
        for row in 0..<rows {
            let values = probabilities + row * vocabularySize
            values[Int(targets[row])] -= 1
            for v in 0..<vocabularySize { values[v] *= scale }
        }
    }
}
