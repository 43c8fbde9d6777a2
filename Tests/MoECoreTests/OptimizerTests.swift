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
