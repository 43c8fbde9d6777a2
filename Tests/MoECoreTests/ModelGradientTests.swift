import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// Whole-model finite-difference checks (Double), one per gate and mode: every parameter of the
/// replicated store (router, centroids, distilled router, bias, ...) and of the experts.
final class ModelGradientTests: XCTestCase {
    /// biased: a nonzero loss-free balancing bias steers the selection (it gets no gradient).
    func checkModel(step: Int = 0, biased: Bool = false, _ configure: (inout RunConfig) -> Void) throws {
        var run = RunConfig()
        run.model.context = 6; run.model.width = 8; run.model.layers = 2; run.model.heads = 2; run.model.ffnHidden = 10
        run.moe.experts = 4; run.moe.topK = 2; run.moe.capacityFactor = nil; run.moe.zLoss = 0.001
        run.train.steps = 100
        run.moe.gate = .topk; run.evomoe.spawnFraction = 0   // the tests' baseline: plain top-k
        configure(&run)
        let gpt = try GPTModel<Double>(run, vocabularySize: 11, communicator: SingleRankCommunicator(),
                                       tokenFrequencies: (0..<11).map { $0 * 3 % 7 })
        gpt.initializeParameters(seed: 3)
        EvoMoERecipe(run).restore(gpt, step: step)
        if biased {
            for layer in gpt.moeLayers {
                layer.gate.state = Dictionary(uniqueKeysWithValues: (0..<run.moe.experts).map { ("bias.\($0)", 0.3 * Double($0 % 3) - 0.2) })
            }
        }
        // Larger weights than the init so every path carries a visible gradient.
        for entry in gpt.replicated.entries where !entry.name.hasSuffix("hash_table") {
            for i in entry.offset..<entry.offset + entry.count { gpt.replicated.values[i] *= 8 }
        }
        for i in 0..<gpt.experts.count { gpt.experts.values[i] *= 8 }
        let key = RandomKey(77)
        let tokens = (0..<12).map { Int32(key.integer($0, below: 11)) }, targets = (0..<12).map { Int32(key.integer(100 + $0, below: 11)) }
        func loss() throws -> Double {
            let result = try gpt.forward(tokens: tokens, targets: targets, batch: 2, length: 6, training: true,
                                         globalTokens: 12, firstGlobalToken: 0, noiseKey: RandomKey(1), step: step)
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

    func testTiedAllMoE() throws { try checkModel { _ in } }
    func testUntiedAlternatingWithCapacity() throws {
        try checkModel { $0.model.tieEmbeddings = false; $0.model.moeEvery = 2; $0.moe.capacityFactor = 1.0 }
    }
    func testDenseOnly() throws { try checkModel { $0.model.moeEvery = 0 } }
    /// Context 6 over attention tiles of 4: the tiled attention path inside the whole model.
    func testTiledAttention() throws { try checkModel { $0.train.attentionTile = 4 } }
    func testSwitchWithJitter() throws {
        try checkModel { $0.moe.gate = .switch; $0.moe.topK = 1; $0.moe.jitter = 0.1; $0.moe.capacityFactor = 1.5 }
    }
    func testGShardEveryPolicy() throws {
        for policy in SecondChoicePolicy.allCases {
            try checkModel { $0.moe.gate = .gshard; $0.moe.gshardSecond = policy; $0.moe.capacityFactor = 1.0 }
        }
    }
    func testDenseToSparseSoftHardAndGumbelWeights() throws {
        try checkModel { $0.moe.gate = .dts; $0.dts.tauMax = 1.0 }
        try checkModel(step: 90) { $0.moe.gate = .dts; $0.dts.hardFraction = 0.5 }
        try checkModel { $0.moe.gate = .dts; $0.dts.weights = .gumbel; $0.dts.threshold = 0.05 }
    }
    func testActivationDenseToSparse() throws {
        try checkModel { $0.moe.gate = .activationDTS; $0.dts.activationTauMax = 0.3; $0.dts.threshold = 0.05 }
        try checkModel { $0.moe.gate = .activationDTS; $0.dts.activation = .tanh; $0.dts.threshold = 0.05 }
    }
    func testHash() throws { try checkModel { $0.moe.gate = .hash } }
    func testBase() throws { try checkModel { $0.moe.gate = .base } }
    func testStableMoEBothStages() throws {
        try checkModel { $0.moe.gate = .stablemoe; $0.gates.stableDistillDimension = 3; $0.gates.stableCapacityFactor = 1.0 }
        try checkModel(step: 50) { $0.moe.gate = .stablemoe; $0.gates.stableDistillDimension = 3 }
    }
    func testExpertChoice() throws {
        try checkModel { $0.moe.gate = .expertChoice; $0.gates.allowNonCausal = true; $0.gates.expertChoiceCapacity = 1.5 }
    }
    func testReLU() throws { try checkModel { $0.moe.gate = .relu; $0.gates.reluInitialLambda = 0.5 } }
    /// The llama block: RMSNorm, RoPE, grouped-query attention with per-head query/key norms,
    /// SwiGLU experts, an untied head; dense blocks with the whole-projection norm; the tiled path.
    func testLlamaBlock() throws {
        try checkModel {
            $0.model.architecture = .llama; $0.model.kvHeads = 1; $0.model.queryKeyNorm = .head; $0.model.tieEmbeddings = false
        }
        try checkModel { $0.model.architecture = .llama; $0.model.queryKeyNorm = .full; $0.model.moeEvery = 2 }
        try checkModel { $0.model.architecture = .llama; $0.model.kvHeads = 1; $0.train.attentionTile = 4 }
    }
    /// DeepSeek-V3's routing: sigmoid affinities normalised over the selected (and raw, and
    /// after drop with capacity), a routed scale, the sequence-wise balance loss, group-limited
    /// selection with a loss-free bias steering it; softmax with a scale and the sequence loss.
    func testSigmoidScoresScaleGroupsBiasAndSequenceLoss() throws {
        let sigmoid: (inout RunConfig) -> Void = {
            $0.moe.score = .sigmoid; $0.moe.balanceLoss = 0; $0.moe.zLoss = 0; $0.moe.routedScale = 2.5; $0.moe.sequenceBalanceLoss = 0.1
        }
        try checkModel(biased: true) { sigmoid(&$0); $0.moe.expertGroups = 2; $0.moe.groupLimit = 1; $0.moe.biasUpdateRate = 0.01 }
        try checkModel { sigmoid(&$0); $0.moe.renormalize = .none; $0.moe.capacityFactor = 1.0; $0.moe.minCapacity = 1 }
        try checkModel { sigmoid(&$0); $0.moe.renormalize = .afterDrop; $0.moe.capacityFactor = 1.0; $0.moe.minCapacity = 1 }
        try checkModel { $0.moe.routedScale = 0.5; $0.moe.sequenceBalanceLoss = 0.2; $0.moe.renormalize = .none }
        try checkModel { $0.moe.routedScale = 1.5; $0.moe.sequenceBalanceLoss = 0.2 }
    }
    /// Fine-grained experts (8 of hidden 3, top-4) beside 2 shared experts; one shared expert
    /// behind its sigmoid gate on the llama block; shared experts through EvoMoE's dense phase.
    func testSharedAndFineGrainedExperts() throws {
        try checkModel { $0.moe.experts = 8; $0.moe.topK = 4; $0.moe.expertHidden = 3; $0.moe.sharedExperts = 2; $0.moe.sharedHidden = 4 }
        try checkModel { $0.model.architecture = .llama; $0.moe.sharedExperts = 1; $0.moe.sharedGate = true; $0.moe.expertHidden = 6 }
        try checkModel { $0.moe.gate = .dts; $0.evomoe.spawnFraction = 0.1; $0.moe.sharedExperts = 1; $0.moe.sharedGate = true }
    }
    func testEvoMoEDensePhase() throws { try checkModel { $0.moe.gate = .dts; $0.evomoe.spawnFraction = 0.1 } }
}
