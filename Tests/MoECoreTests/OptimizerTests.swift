import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoEIO

final class OptimizerTests: XCTestCase {
    /// AdamW against a direct transcription of the update rule, in Double, with one decayed and
    /// one undecayed tensor, a gradient scale (clipping) and 5 steps.
    func testAdamWMatchesTheReferenceUpdate() {
        let store = ParameterStore<Double, Replicated>()
        let matrix = store.add(ParameterPath("w", role: .routingTable), rows: 3, columns: 7, weightDecay: true, initialization: .normal(standardDeviation: 1))
        _ = store.add(ParameterPath("b", role: .routerBias), rows: 1, columns: 19, weightDecay: false, initialization: .normal(standardDeviation: 1))
        store.initialize(key: RandomKey(3))
        let settings = AdamWSettings(beta1: 0.9, beta2: 0.95, epsilon: 1e-8, weightDecay: 0.1)
        let optimizer = AdamW(store: store, settings: settings)
        var p = Array(UnsafeBufferPointer(start: store.values, count: store.count))
        var m = [Double](repeating: 0, count: p.count), v = m
        let decayed = (0..<p.count).map { $0 < matrix.count }
        for step in 1...5 {
            let learningRate = 0.01 * Double(step), scale = 0.5
            for index in 0..<p.count { store.gradients[index] = sin(Double(index * step)) }
            optimizer.update(learningRate: learningRate, gradientScale: scale)
            for index in 0..<p.count {
                let g = store.gradients[index] * scale
                m[index] = 0.9 * m[index] + 0.1 * g
                v[index] = 0.95 * v[index] + 0.05 * g * g
                let mHat = m[index] / (1 - pow(0.9, Double(step))), vHat = v[index] / (1 - pow(0.95, Double(step)))
                if decayed[index] { p[index] -= learningRate * 0.1 * p[index] }
                p[index] -= learningRate * mHat / (vHat.squareRoot() + 1e-8)
            }
            for index in 0..<p.count {
                XCTAssertEqual(store.values[index], p[index], accuracy: 1e-12 * max(1, abs(p[index])), "step \(step) index \(index)")
            }
        }
        XCTAssertEqual(optimizer.stepCount, 5)
    }

    /// A deferred update (`DeferredUpdate`) applies each entry as the forward reaches it, in the
    /// forward's reading order (embeddings, then each block's replicated parameters and its
    /// experts, then the final norm), and ends where `update` would, bit for bit.
    func testDeferredUpdateFollowsTheForwardAndMatchesTheUpdate() {
        func stores() -> (ParameterStore<Float, Replicated>, ParameterStore<Float, ExpertSharded>) {
            let replicated = ParameterStore<Float, Replicated>(), experts = ParameterStore<Float, ExpertSharded>()
            _ = replicated.add(ParameterPath("embedding", role: .tokenEmbedding), rows: 5, columns: 3, weightDecay: false,
                               initialization: .normal(standardDeviation: 1))
            for block in 0..<2 {
                _ = replicated.add(ParameterPath("blocks.\(block).attention", role: .attention, block: block), rows: 3, columns: 3,
                                   weightDecay: true, initialization: .normal(standardDeviation: 1))
                _ = experts.add(ParameterPath("blocks.\(block).expert", role: .expert, block: block), rows: 3, columns: 4,
                                weightDecay: true, initialization: .normal(standardDeviation: 1))
            }
            _ = replicated.add(ParameterPath("final_norm", role: .norm), rows: 1, columns: 3, weightDecay: false,
                               initialization: .normal(standardDeviation: 1))
            replicated.initialize(key: RandomKey(5))
            experts.initialize(key: RandomKey(6))
            for index in 0..<replicated.count { replicated.gradients[index] = sin(Float(index)) }
            for index in 0..<experts.count { experts.gradients[index] = cos(Float(index)) }
            return (replicated, experts)
        }
        let settings = AdamWSettings(beta1: 0.9, beta2: 0.95, epsilon: 1e-8, weightDecay: 0.1)
        let (replicated, experts) = stores(), (expectedReplicated, expectedExperts) = stores()
        let deferred = DeferredUpdate(replicated: AdamW(store: replicated, settings: settings), experts: AdamW(store: experts, settings: settings))
        let plain = (AdamW(store: expectedReplicated, settings: settings), AdamW(store: expectedExperts, settings: settings))
        for step in 0..<3 {
            plain.0.update(learningRate: 0.01, gradientScale: 0.5, clearingGradients: true)
            plain.1.update(learningRate: 0.01, gradientScale: 0.5, clearingGradients: true)
            deferred.schedule(learningRate: 0.01, gradientScale: 0.5, clearingGradients: true)
            // Which entries (replicated 0 embedding, 1 block 0, 2 block 1, 3 final norm; experts 0
            // and 1 by block) still wait for their update.
            func waiting() -> [Bool] {
                (0..<4).map { deferred.replicated.isScheduled(entry: $0) } + (0..<2).map { deferred.experts.isScheduled(entry: $0) }
            }
            XCTAssertEqual(waiting(), [true, true, true, true, true, true], "step \(step)")
            deferred.applyUpdates(before: .embeddings)
            XCTAssertEqual(waiting(), [false, true, true, true, true, true], "step \(step)")
            deferred.applyUpdates(before: .block(0))
            XCTAssertEqual(waiting(), [false, false, true, true, true, true], "step \(step)")
            XCTAssertTrue(deferred.runNext())   // a wait in block 0: its experts come next
            XCTAssertEqual(waiting(), [false, false, true, true, false, true], "step \(step)")
            XCTAssertTrue(deferred.runNext())
            XCTAssertEqual(waiting(), [false, false, false, true, false, true], "step \(step)")
            deferred.applyUpdates(before: .experts(ofBlock: 1))
            XCTAssertEqual(waiting(), [false, false, false, true, false, false], "step \(step)")
            XCTAssertTrue(deferred.isPending)
            deferred.applyAll()
            XCTAssertFalse(deferred.isPending)
            XCTAssertFalse(deferred.runNext())
            for index in 0..<replicated.count { replicated.gradients[index] = sin(Float(index * (step + 2))) }
            for index in 0..<experts.count { experts.gradients[index] = cos(Float(index * (step + 2))) }
            for index in 0..<replicated.count { expectedReplicated.gradients[index] = sin(Float(index * (step + 2))) }
            for index in 0..<experts.count { expectedExperts.gradients[index] = cos(Float(index * (step + 2))) }
        }
        XCTAssertEqual(Array(UnsafeBufferPointer(start: replicated.values, count: replicated.count)),
                       Array(UnsafeBufferPointer(start: expectedReplicated.values, count: expectedReplicated.count)))
        XCTAssertEqual(Array(UnsafeBufferPointer(start: experts.values, count: experts.count)),
                       Array(UnsafeBufferPointer(start: expectedExperts.values, count: expectedExperts.count)))
        XCTAssertEqual(Array(UnsafeBufferPointer(start: deferred.experts.secondMoment, count: experts.count)),
                       Array(UnsafeBufferPointer(start: plain.1.secondMoment, count: experts.count)))
        XCTAssertEqual(deferred.replicated.stepCounts, plain.0.stepCounts)
    }

    func testScheduleWarmsUpThenDecaysToTheMinimum() {
        let schedule = LearningRateSchedule(peak: 1e-3, minimum: 1e-4, warmupSteps: 10, totalSteps: 110)
        XCTAssertEqual(schedule.learningRate(at: 0), 1e-4, accuracy: 1e-15)
        XCTAssertEqual(schedule.learningRate(at: 9), 1e-3, accuracy: 1e-15)
        XCTAssertEqual(schedule.learningRate(at: 10), 1e-3, accuracy: 1e-15)
        XCTAssertEqual(schedule.learningRate(at: 60), 5.5e-4, accuracy: 1e-12, "half way down the cosine")
        XCTAssertEqual(schedule.learningRate(at: 110), 1e-4, accuracy: 1e-15)
        for step in 10..<110 { XCTAssertGreaterThanOrEqual(schedule.learningRate(at: step), schedule.learningRate(at: step + 1)) }
    }
}
