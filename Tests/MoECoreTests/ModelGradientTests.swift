import XCTest
import MoECore
import MoEComm
import MoEIO

final class ModelGradientTests: XCTestCase {
    func checkModel(tie: Bool, moeEvery: Int, capacityFactor: Double?) throws {
        var model = ModelConfig()
        model.context = 6; model.width = 8; model.layers = 2; model.heads = 2; model.ffnHidden = 10
        model.moeEvery = moeEvery; model.tieEmbeddings = tie
        var moe = MoEConfig()
        moe.experts = 4; moe.topK = 2; moe.capacityFactor = capacityFactor; moe.zLoss = 0.001
        let gpt = try GPTModel<Double>(config: model, moe: moe, vocabularySize: 11, training: TrainConfig(),
                                       communicator: SingleRankCommunicator())
        gpt.initializeParameters(seed: 3)
        // Larger weights than the init so every path carries a visible gradient.
        for i in 0..<gpt.replicated.count { gpt.replicated.values[i] *= 8 }
        for i in 0..<gpt.experts.count { gpt.experts.values[i] *= 8 }
        let key = RandomKey(77)
        let tokens = (0..<12).map { Int32(key.integer($0, below: 11)) }, targets = (0..<12).map { Int32(key.integer(100 + $0, below: 11)) }
        func loss() throws -> Double {
            let result = try gpt.forward(tokens: tokens, targets: targets, batch: 2, length: 6, training: true,
                                         globalTokens: 12, firstGlobalToken: 0, noiseKey: RandomKey(1))
            return result.localLossSum / 12 + result.auxiliaryLoss
        }
        gpt.zeroGradients()
        _ = try loss()
        try gpt.backward(globalTokens: 12)
        let checker = GradientChecker(samplesPerTensor: 6)
        for entry in gpt.replicated.entries {
            try checker.check(entry.name, values: gpt.replicated.values + entry.offset,
                              gradients: gpt.replicated.gradients + entry.offset, count: entry.count, loss: loss)
        }
        for entry in gpt.experts.entries {
            try checker.check(entry.name, values: gpt.experts.values + entry.offset,
                              gradients: gpt.experts.gradients + entry.offset, count: entry.count, loss: loss)
        }
    }

    func testTiedAllMoE() throws { try checkModel(tie: true, moeEvery: 1, capacityFactor: nil) }
    func testUntiedAlternatingWithCapacity() throws { try checkModel(tie: false, moeEvery: 2, capacityFactor: 1.0) }
    func testDenseOnly() throws { try checkModel(tie: true, moeEvery: 0, capacityFactor: nil) }
}
