import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// The key/value-cache decoder against the full forward it replaces.
final class GenerationTests: XCTestCase {
    override func setUp() { BLASInfo.setThreads(1) }

    func model(gate: GateKind = .topk, llama: Bool = false, layers: Int = 2) throws -> GPTModel<Float> {
        var run = RunConfig()
        run.model.context = 16; run.model.width = 16; run.model.layers = layers; run.model.heads = 2; run.model.ffnHidden = 32
        if llama {
            run.model.architecture = .llama; run.model.kvHeads = 1; run.model.queryKeyNorm = .head; run.model.tieEmbeddings = false
        }
        run.moe.experts = 4; run.moe.topK = 2; run.moe.gate = gate; run.evomoe.spawnFraction = 0
        run.train.precision = .fp32
        let model = try GPTModel<Float>(run, vocabularySize: 256, communicator: SingleRankCommunicator())
        model.initializeParameters(seed: 4)
        // Larger weights than the init, so the logits differ clearly between tokens.
        for index in 0..<model.replicated.count { model.replicated.values[index] *= 4 }
        for index in 0..<model.experts.count { model.experts.values[index] *= 4 }
        return model
    }

    /// Prefill 5 positions, then one at a time: each position's logits equal the full forward's
    /// over the same prefix (dropless routing in both), for a dense-weight and a Gumbel gate.
    func testCachedLogitsEqualTheFullForward() throws {
        for (gate, llama) in [(GateKind.topk, false), (.dts, false), (.topk, true)] {
            let model = try model(gate: gate, llama: llama)
            let tokens: [Int32] = (0..<12).map { Int32(($0 * 37 + 11) % 256) }
            let cache = DecodeCache<Float>()
            var worst: Float = 0
            for end in 5...12 {
                let new = end == 5 ? Array(tokens[0..<5]) : [tokens[end - 1]]
                let cached = Array(UnsafeBufferPointer(start: try model.decode(new, cache: cache, noiseKey: RandomKey(1), step: 0), count: 256))
                _ = try model.forward(tokens: Array(tokens[0..<end]), targets: nil, batch: 1, length: end, training: false,
                                      globalTokens: end, firstGlobalToken: 0, noiseKey: RandomKey(1), dropless: true)
                let full = model.logitsRow(end - 1)
                for index in 0..<256 { worst = max(worst, abs(cached[index] - full[index])) }
            }
            XCTAssertLessThan(worst, 1e-4, "\(gate), llama \(llama): cached logits differ from the full forward by \(worst)")
        }
    }

    /// llama: once the window is full the cache drops its oldest keys and values and slides by
    /// one, so every layer attends to the last 16 positions (sliding-window attention, as
    /// Mistral's cache). With one layer a key depends only on its token and position, so each
    /// position's logits equal a full forward over the last 16 tokens (which rotates from 0:
    /// attention sees only distances), through 40 tokens. With two layers the cached keys of
    /// the second layer remember tokens that left the window, which a forward over the window
    /// cannot: the logits agree until the first slide and then differ.
    func testLlamaCacheSlidesByOne() throws {
        let tokens: [Int32] = (0..<40).map { Int32(($0 * 53 + 7) % 256) }, context = 16
        for layers in [1, 2] {
            let model = try model(llama: true, layers: layers), cache = DecodeCache<Float>()
            var worstInWindow: Float = 0, worstAfterSlide: Float = 0
            for end in 1...40 {
                let decoded = try model.decode([tokens[end - 1]], cache: cache, noiseKey: RandomKey(1), step: 0)
                let cached = Array(UnsafeBufferPointer(start: decoded, count: 256))
                let window = Array(tokens[max(0, end - context)..<end])
                _ = try model.forward(tokens: window, targets: nil, batch: 1, length: window.count, training: false,
                                      globalTokens: window.count, firstGlobalToken: 0, noiseKey: RandomKey(1), dropless: true)
                let full = model.logitsRow(window.count - 1)
                for index in 0..<256 {
                    let difference = abs(cached[index] - full[index])
                    if end <= context { worstInWindow = max(worstInWindow, difference) } else { worstAfterSlide = max(worstAfterSlide, difference) }
                }
            }
            XCTAssertEqual(cache.count, context)
            XCTAssertEqual(cache.firstPosition, 40 - context)
            XCTAssertLessThan(worstInWindow, 1e-4, "\(layers) layers: cached logits before the slide")
            if layers == 1 {
                XCTAssertLessThan(worstAfterSlide, 1e-4, "one layer: sliding cached logits against the forward over the window")
            } else {
                XCTAssertGreaterThan(worstAfterSlide, 1e-2, "two layers: the cache keeps what left the window")
            }
        }
    }

    /// Greedy text with the cache equals greedy text without it, across several window restarts
    /// (50 tokens through a context of 16); top-k 1 and a tiny top-p are greedy too.
    func testGreedyWithAndWithoutCacheAgree() throws {
        let model = try model()
        func sample(_ settings: SamplingSettings, cache: Bool) throws -> [Int32] {
            var out: [Int32] = []
            try Sampler.generate(model: model, prompt: [72, 101, 108], count: 50, settings: settings, useCache: cache) { out.append($0) }
            return out
        }
        let greedy = try sample(SamplingSettings(temperature: 0), cache: false)
        XCTAssertEqual(try sample(SamplingSettings(temperature: 0), cache: true), greedy)
        XCTAssertEqual(try sample(SamplingSettings(temperature: 1, topK: 1, seed: 5), cache: true), greedy)
        XCTAssertEqual(try sample(SamplingSettings(temperature: 1, topP: 1e-6, seed: 5), cache: true), greedy)
        XCTAssertGreaterThan(Set(greedy).count, 1, "the model must not emit one token only")
        let sampled = try sample(SamplingSettings(temperature: 1, topK: 20, topP: 0.9, seed: 5), cache: true)
        XCTAssertEqual(try sample(SamplingSettings(temperature: 1, topK: 20, topP: 0.9, seed: 5), cache: true), sampled, "a seed reproduces")
        XCTAssertNotEqual(sampled, greedy)
    }
}
