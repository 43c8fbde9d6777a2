import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// EvoMoE and the gates that change over a run, through the Trainer.
final class RecipeTests: XCTestCase {
    override func setUp() { BLASInfo.setThreads(1) }

    func trainer(_ configure: (inout RunConfig) -> Void) throws -> Trainer {
        let config = DistributedTrainingTests.config(experts: 4, globalBatch: 8, ranks: 1, configure)
        return try Trainer(config: config, communicator: SingleRankCommunicator(), trainFiles: [DistributedTrainingTests.tokens],
                           validationFiles: [])
    }

    /// docs/ALGORITHMS.md 4.1: with r = 0, no noise and a zero router, the MoE right after the spawn
    /// computes exactly what the dense FFN computed right before it (top-k weights sum to 1).
    func testSpawnWithoutMaskOrNoiseEqualsTheDenseModel() throws {
        let trainer = try trainer {
            $0.evomoe.spawnFraction = 0.1; $0.evomoe.maskRatio = 0; $0.evomoe.noise = 0
            $0.moe.capacityFactor = nil; $0.train.steps = 20
        }
        XCTAssertEqual(trainer.phase, .dense)
        _ = try trainer.trainStep()
        let tokens = Array(DistributedTrainingTests.tokens.tokens[0..<64].map(Int32.init))
        func loss() throws -> Double {
            try trainer.model.forward(tokens: tokens, targets: tokens, batch: 4, length: 16, training: true, globalTokens: 64,
                                      firstGlobalToken: 0, noiseKey: RandomKey(1), step: trainer.state.attempted).localLoss
        }
        let dense = try loss()
        _ = trainer.recipe.spawn(trainer.model, seed: 1)
        for layer in trainer.model.moeLayers {
            guard let router = layer.gate.router as? LinearRouter<Float> else { return XCTFail("a linear router expected") }
            router.weight.value.update(repeating: 0, count: router.weight.count)
        }
        XCTAssertEqual(trainer.phase, .sparse)
        XCTAssertEqual(try loss(), dense, accuracy: 1e-6 * dense)
    }

    /// The recipe end to end: dense, spawn at T_s (fresh AdamW state for the new tensors), DTS from
    /// (nearly) dense to one expert per token after H; the phases and temperature are reported.
    func testEvoMoERecipeGoesFromDenseToSparse() throws {
        let trainer = try trainer {
            $0.moe.gate = .dts; $0.evomoe.spawnFraction = 0.1; $0.dts.annealFraction = 0.5; $0.dts.hardFraction = 0.7
            $0.dts.threshold = 0.001   // the reference code's small gamma: nearly every expert at first
            $0.train.steps = 40
        }
        var phases: [TrainingPhase] = [], active: [Double] = [], temperatures: [Double] = []
        for _ in 0..<40 {
            let report = try trainer.trainStep()
            phases.append(report.phase)
            active.append(report.moeLayers.map(\.activeExperts).reduce(0, +) / Double(report.moeLayers.count))
            temperatures.append(report.temperature ?? .nan)
            if trainer.state.attempted == 4 {
                XCTAssertEqual(trainer.expertOptimizer.stepCount, 0, "spawned experts start a new AdamW history")
                let router = trainer.model.replicated.entries.firstIndex { $0.name == "blocks.0.moe.router" }!
                XCTAssertEqual(trainer.replicatedOptimizer.stepCounts[router], 0)
            }
        }
        XCTAssertEqual(Array(phases[0..<4]), Array(repeating: .dense, count: 4))
        XCTAssertEqual(phases[4], .soft)
        XCTAssertEqual(phases.last, .hard)
        XCTAssertGreaterThan(active[4], 3, "just after the spawn the DTS gate is nearly dense: \(active)")
        XCTAssertEqual(active.last!, 1, "hard top-1 at the end")
        XCTAssertEqual(temperatures[4], 2.0, accuracy: 1e-12)
        XCTAssertEqual(temperatures[39], 0.5, accuracy: 1e-12)
    }

    /// The compute a step counts is what its gate computed, from first principles: every token
    /// through the parameters outside the experts (the dense FFNs excepted) and attention, plus one
    /// expert's worth per kept assignment. EvoMoE's dense phase costs one expert per token, like
    /// hard top-1; the soft DTS phase costs every expert it kept; the count carries over steps.
    func testTrainingComputeCountsWhatEachPhaseComputes() throws {
        let trainer = try trainer {
            $0.moe.gate = .dts; $0.moe.topK = 1; $0.moe.capacityFactor = nil; $0.dts.threshold = 0.001
            $0.evomoe.spawnFraction = 0.1; $0.dts.annealFraction = 0.5; $0.dts.hardFraction = 0.7; $0.train.steps = 40
        }
        let model = trainer.model, c = Double(model.config.width), h = Double(model.config.ffnHidden)
        let layers = Double(model.config.layers), context = Double(model.config.context)
        let tokens = Double(trainer.globalBatchTokens), moeLayers = Double(model.moeLayers.count)
        let perExpert = 2 * c * h + h + c
        // One dense FFN per MoE layer is replicated; a token passes through it only as an assignment.
        let perToken = 6 * (Double(model.replicated.count) - moeLayers * perExpert) + 6 * layers * context * c
        var phaseCosts: [TrainingPhase: Set<Double>] = [:], before = 0.0, soft = 0
        for _ in 0..<40 {
            let report = try trainer.trainStep()
            let kept = Double(report.moeLayers.map(\.keptCount).reduce(0, +))
            let spent = trainer.state.trainingFlops - before
            before = trainer.state.trainingFlops
            XCTAssertEqual(spent, tokens * perToken + 6 * perExpert * kept, accuracy: 1e-9 * spent, "step \(report.step)")
            if report.phase == .soft && kept > 2 * moeLayers * tokens { soft += 1 }
            if report.phase != .soft { XCTAssertEqual(kept, moeLayers * tokens, "\(report.phase) computes one expert per token") }
            phaseCosts[report.phase, default: []].insert(spent)
        }
        XCTAssertGreaterThan(soft, 2, "soft DTS steps keep several experts per token and cost more")
        XCTAssertEqual(phaseCosts[.dense], phaseCosts[.hard], "dense phase and hard top-1 cost the same")
        XCTAssertEqual(phaseCosts[.hard]?.count, 1)
    }

    /// StableMoE stage 2: routing is a fixed function of the token id while the model trains.
    func testStableMoEStage2RoutingIsFrozen() throws {
        let trainer = try trainer { $0.moe.gate = .stablemoe; $0.gates.stableStage2Fraction = 0.25; $0.train.steps = 20 }
        for _ in 0..<5 { _ = try trainer.trainStep() }
        XCTAssertEqual(trainer.phase, .stage2)
        var routingByToken: [Int32: [Int32]] = [:]
        let tokens = Array(DistributedTrainingTests.tokens.tokens[0..<64].map(Int32.init))
        for _ in 0..<6 {
            _ = try trainer.trainStep()
            _ = try trainer.model.forward(tokens: tokens, targets: tokens, batch: 4, length: 16, training: true, globalTokens: 64,
                                          firstGlobalToken: 0, noiseKey: RandomKey(1), step: trainer.state.attempted)
            for layer in trainer.model.moeLayers {
                let gate = layer.gate.policy as! StableMoEPolicy<Float>
                for (token, expert) in zip(tokens, gate.choice) {
                    routingByToken[token, default: []].append(Int32(expert) + 100 * Int32(layer.layerIndex))
                }
            }
        }
        for (token, experts) in routingByToken {
            XCTAssertEqual(Set(experts).count, trainer.model.moeLayers.count, "token \(token) changed experts in stage 2")
        }
    }

    /// After a skipped (non-finite) update, StableMoE's stage is counted in applied updates both
    /// where the forward pass chooses its routing and where the distilled router is frozen, so
    /// the two agree at the stage-2 boundary. (They used to disagree: the freezing counted
    /// attempted steps, and froze the distilled router for one step of stage-1 training.)
    func testStableMoEStageAndFreezingAgreeAfterASkippedUpdate() throws {
        let trainer = try trainer { $0.moe.gate = .stablemoe; $0.gates.stableStage2Fraction = 0.25; $0.train.steps = 20 }
        trainer.hooks = FaultInjector([FaultInjection(kind: .nanGradient, rank: 0, step: 2)], rank: 0)
        let policy = trainer.model.moeLayers[0].gate.policy as! StableMoEPolicy<Float>
        XCTAssertEqual(policy.stage2Step, 5)
        for _ in 0..<5 { _ = try trainer.trainStep() }
        XCTAssertEqual(trainer.state.skipped, 1)
        // Attempted step 5 is applied update 4: still stage 1, and the distilled router trains.
        XCTAssertEqual(trainer.phase, .stage1)
        let table = { Array(UnsafeBufferPointer(start: policy.distilledTable.value, count: policy.distilledTable.count)) }
        let before = table()
        XCTAssertEqual(try trainer.trainStep().phase, .stage1)
        XCTAssertTrue(table() != before, "the distilled router trains in its last stage-1 step")
        // The next step is stage 2: routing by the distilled router, which no longer changes.
        XCTAssertEqual(trainer.phase, .stage2)
        let frozen = table()
        XCTAssertEqual(try trainer.trainStep().phase, .stage2)
        XCTAssertTrue(table() == frozen, "stage 2 freezes the distilled router")
    }

    /// ReLU routing's controller drives the fraction of zero weights toward 1 - k/E (here k = 1:
    /// 0.75, one active expert of 4, from about half active at initialisation).
    func testReLUSparsityApproachesItsTarget() throws {
        let trainer = try trainer { $0.moe.gate = .relu; $0.moe.topK = 1; $0.train.steps = 200; $0.gates.reluInitialLambda = 1e-3 }
        var active: [Double] = []
        for _ in 0..<200 {
            let report = try trainer.trainStep()
            active.append(report.moeLayers.map(\.activeExperts).reduce(0, +) / Double(report.moeLayers.count))
        }
        let late = active.suffix(40).reduce(0, +) / 40
        XCTAssertGreaterThan(active.prefix(5).reduce(0, +) / 5, 1.6, "starts near half active: \(active.prefix(5))")
        XCTAssertEqual(late, 1, accuracy: 0.3, "the target is 1 active expert of 4 (sparsity 0.75): \(late)")
    }
}
