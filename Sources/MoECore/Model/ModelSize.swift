#if canImport(Glibc)
import Glibc
#endif
import MoEIO

/// The memory a rank's model needs, estimated from the config before anything is allocated, so
/// that a size no machine holds (a mistyped `model.ffn_hidden`, a token file declaring a huge
/// vocabulary) is a one-line error naming the sizes instead of an allocation failure. Counted in
/// checked arithmetic (an overflow is "too large"): every parameter's value, gradient, two AdamW
/// moments and bf16 copy (18 bytes), and the logits with their gradient.
public struct ModelSize {
    public let bytes: Int?

    public init(_ run: RunConfig, vocabularySize: Int, localExperts: Int) {
        let model = run.model, c = model.width, h = model.ffnHidden, v = vocabularySize
        let matrices = model.architecture == .llama ? 3 : 2   // SwiGLU's gate, up and down
        let moeLayers = (0..<model.layers).filter { GPTModel<Float>.isMoE(layer: $0, every: model.moeEvery) }.count
        let terms: [[Int]] = [
            [v, c, model.tieEmbeddings ? 1 : 2], [model.context, c],                     // embeddings, head
            [model.layers, 4, c, c], [model.layers - moeLayers, matrices, c, h],                // attention, dense FFNs
            [moeLayers, localExperts, matrices, c, run.moe.expertHidden ?? h], [moeLayers, 1 + run.moe.sharedExperts, matrices, c, run.moe.sharedHidden ?? h], [moeLayers, c, run.moe.experts],     // experts (+ EvoMoE's), routers
            [moeLayers, v, run.gates.stableDistillDimension + 1],                        // hash and distilled tables
        ]
        var parameters: Int? = 0
        for term in terms { parameters = ModelSize.add(parameters, ModelSize.product(term)) }
        let logits = ModelSize.product([run.train.batchSize, model.context, v, 8])
        bytes = ModelSize.add(parameters.flatMap { ModelSize.product([$0, 18]) }, logits)
    }

    static func product(_ factors: [Int]) -> Int? {
        factors.reduce(Int?(1)) { partial, factor in
            guard let partial else { return nil }
            let result = partial.multipliedReportingOverflow(by: max(0, factor))
            return result.overflow ? nil : result.partialValue
        }
    }

    static func add(_ a: Int?, _ b: Int?) -> Int? {
        guard let a, let b else { return nil }
        let result = a.addingReportingOverflow(b)
        return result.overflow ? nil : result.partialValue
    }

    /// This machine's physical memory in bytes.
    public static var physicalMemory: Int { Int(sysconf(Int32(_SC_PHYS_PAGES))) * Int(sysconf(Int32(_SC_PAGESIZE))) }

    public struct TooLarge: Error, CustomStringConvertible {
        public let bytes: Int?, available: Int, run: RunConfig, vocabularySize: Int
        public var description: String {
            let needed = bytes.map { String(format: "%.1f GiB", Double($0) / 1_073_741_824) } ?? "more bytes than a 64-bit count holds"
            return "the model needs \(needed) per rank (model.width \(run.model.width), model.ffn_hidden \(run.model.ffnHidden), "
                + "model.layers \(run.model.layers), model.context \(run.model.context), vocabulary \(vocabularySize)), "
                + String(format: "more than this machine's %.1f GiB", Double(available) / 1_073_741_824)
        }
    }

    /// Throws `TooLarge` when the estimate exceeds this machine's memory.
    public func check(_ run: RunConfig, vocabularySize: Int) throws {
        let available = ModelSize.physicalMemory
        guard let bytes, bytes <= available else { throw TooLarge(bytes: bytes, available: available, run: run, vocabularySize: vocabularySize) }
    }
}
