#if canImport(Glibc)
import Glibc
#endif

/// Autoregressive sampling from a trained model on one rank.
public enum Sampler {
    /// Appends `count` tokens to `prompt`, calling `emit` with each. Each new token is drawn from
    /// softmax(logits / temperature) of the last position, using the last `context` tokens as
    /// the window; temperature 0 takes the most likely token. The draw for token i uses counter i
    /// of a key derived from `seed`, so a seed reproduces a sample exactly.
    public static func generate(model: GPTModel<Float>, prompt: [Int32], count: Int, temperature: Double, seed: Int,
                                step: Int = 0, emit: (Int32) -> Void) throws {
        precondition(!prompt.isEmpty, "generation needs at least one prompt token")
        var sequence = prompt
        let key = RandomKey(UInt64(seed)).derive("sampling")
        let vocabularySize = model.vocabularySize
        var probabilities = [Double](repeating: 0, count: vocabularySize)
        for index in 0..<count {
            let window = Array(sequence.suffix(model.config.context))
            _ = try model.forward(tokens: window, targets: nil, batch: 1, length: window.count, training: false,
                                  globalTokens: window.count, firstGlobalToken: 0, noiseKey: key.derive(index), step: step)
            let logits = model.logitsRow(window.count - 1)
            var next = 0
            if temperature <= 0 {
                for token in 1..<vocabularySize where logits[token] > logits[next] { next = token }
            } else {
                var largest = -Double.infinity
                for token in 0..<vocabularySize { largest = max(largest, Double(logits[token])) }
                var total = 0.0
                for token in 0..<vocabularySize {
                    probabilities[token] = exp((Double(logits[token]) - largest) / temperature)
                    total += probabilities[token]
                }
                var threshold = key.uniform(index) * total
                next = vocabularySize - 1
                for token in 0..<vocabularySize {
                    threshold -= probabilities[token]
                    if threshold < 0 { next = token; break }
                }
            }
            sequence.append(Int32(next))
            emit(Int32(next))
        }
    }
}
