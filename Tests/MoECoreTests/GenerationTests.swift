import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// The key/value-cache decoder against the full forward it replaces.
final class GenerationTests: XCTestCase {
    override func setUp() { BLASInfo.setThreads(1) }

    func model(gate: GateKind = .topk) throws -> GPTModel<Float> {
        var run = RunConfig()
        run.model.context = 16; run.model.width = 16; run.model.layers = 2; run.model.heads = 2; run.model.ffnHidden = 32
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
        for gate in [GateKind.topk, .dts] {
            let model = try model(gate: gate)
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
            XCTAssertLessThan(worst, 1e-4, "\(gate): cached logits differ from the full forward by \(worst)")
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
