#if canImport(Glibc)
import Glibc
#endif

/// How the next token is drawn from the logits.
public struct SamplingSettings: Sendable {
    /// 0 picks the most likely token (greedy).
    public var temperature: Double
    /// Keep only the k most likely tokens (0: all).
    public var topK: Int
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    public var topP: Double
    /// The draw for new token i uses counter i of a key derived from the seed.
    public var seed: Int
    /// Draw only ids below this (the tokenizer's vocabulary when the model's is padded beyond
    /// it); nil: the model's whole vocabulary.
    public var vocabularyLimit: Int?

    public init(temperature: Double, topK: Int = 0, topP: Double = 1, seed: Int = 0, vocabularyLimit: Int? = nil) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
        self.vocabularyLimit = vocabularyLimit
    }
}

/// Autoregressive sampling from a trained model (docs/ARCHITECTURE.md, "Generation").
///
/// The window: the model sees the tokens from the window's start; when a new token would not fit
/// in `model.context` positions, a gpt2 window restarts at the last context/2 tokens (absolute
/// position embeddings forbid sliding a cached window by one), a llama window slides by one
/// (rotary positions: the cache drops its oldest key). With the cache, the prompt (or a
/// restarted window) is one prefill and each further token one position; without it, each token
/// is a forward over the whole window. Both give the same tokens, except a llama model's once its
/// window slid: the cache is then sliding-window attention (each layer's cached keys were
/// computed while older tokens were visible, as in Mistral), the forward recomputes the window.
public enum Sampler {
    public static func generate(model: GPTModel<Float>, prompt: [Int32], count: Int, settings: SamplingSettings,
                                useCache: Bool = true, step: Int = 0, emit: (Int32) -> Void) throws {
        precondition(!prompt.isEmpty, "generation needs at least one prompt token")
        let context = model.config.context, key = RandomKey(UInt64(settings.seed)).derive("sampling")
        var sequence = prompt, windowStart = max(0, prompt.count - context)
        let cache = DecodeCache<Float>()
        var pending = Array(sequence[windowStart...])   // tokens of the window not yet in the cache
        var scratch = [Double](repeating: 0, count: model.vocabularySize)
        for index in 0..<count {
            let logits: UnsafeMutablePointer<Float>
            if useCache {
                logits = try model.decode(pending, cache: cache, noiseKey: key.derive(index), step: step)
            } else {
                let window = Array(sequence[windowStart...])
                _ = try model.forward(tokens: window, targets: nil, batch: 1, length: window.count, training: false,
                                      globalTokens: window.count, firstGlobalToken: 0, noiseKey: key.derive(index), step: step,
                                      dropless: true)
                logits = model.logitsRow(window.count - 1)
            }
            let next = Int32(draw(logits, vocabularySize: min(model.vocabularySize, settings.vocabularyLimit ?? .max), settings: settings,
                                  uniform: key.uniform(index), scratch: &scratch))
            sequence.append(next)
            emit(next)
            pending = [next]
            if sequence.count - windowStart > context {
                if model.embedding.positionTable == nil {
                    windowStart += 1   // rotary positions: the window slides (the cache drops its oldest key)
                } else {
                    windowStart = sequence.count - context / 2
                    pending = Array(sequence[windowStart...])
                    cache.reset()
                }
            }
        }
    }

    /// The next token: greedy at temperature 0; else softmax(logits / temperature) restricted to
    /// the top k and then to the top-p nucleus, renormalised, drawn with `uniform` in [0, 1).
    static func draw(_ logits: UnsafePointer<Float>, vocabularySize: Int, settings: SamplingSettings, uniform: Double,
                     scratch: inout [Double]) -> Int {
        guard settings.temperature > 0 else {
            var best = 0
            for token in 1..<vocabularySize where logits[token] > logits[best] { best = token }
            return best
        }
        var largest = -Double.infinity
        for token in 0..<vocabularySize { largest = max(largest, Double(logits[token])) }
        for token in 0..<vocabularySize { scratch[token] = exp((Double(logits[token]) - largest) / settings.temperature) }
        // Candidates by decreasing probability (ties: lower id), cut by top-k then top-p.
        var order = Array(0..<vocabularySize).sorted { (scratch[$0], -$0) > (scratch[$1], -$1) }
        if settings.topK > 0 { order = Array(order.prefix(settings.topK)) }
        let total = order.reduce(0.0) { $0 + scratch[$1] }
        if settings.topP < 1 {
            var mass = 0.0, kept = 0
            while kept < order.count && mass < settings.topP * total { mass += scratch[order[kept]]; kept += 1 }
            order = Array(order.prefix(max(kept, 1)))
        }
        var threshold = uniform * order.reduce(0.0) { $0 + scratch[$1] }
        for token in order {
            threshold -= scratch[token]
            if threshold < 0 { return token }
        }
        return order.last!
    }
}
