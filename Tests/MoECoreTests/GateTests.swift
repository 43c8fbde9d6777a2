import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoETestSupport
import MoEIO

/// The defining property of each gate (docs/ALGORITHMS.md), on standalone gates in Double.
final class GateTests: XCTestCase {
    let communicator = SingleRankCommunicator()

    func context(rows: Int, tokenIds: UnsafePointer<Int32>? = nil, training: Bool = true, step: Int = 0,
                 noise: UInt64 = 5) -> RoutingContext {
        RoutingContext(training: training, communicator: communicator, globalTokens: rows, firstGlobalToken: 0,
                       tokenIds: tokenIds, noiseKey: RandomKey(noise), step: step)
    }

    func counts(_ routing: Routing<Double>, experts: Int) -> [Int] {
        var counts = [Int](repeating: 0, count: experts)
        for e in routing.experts { counts[Int(e)] += 1 }
        return counts
    }

    func testBaseGivesEveryExpertExactlyItsShareAndIsNearOptimal() throws {
        let store = ParameterStore<Double, Replicated>()
        let centroids = store.add(ParameterPath("c", role: .routingTable), rows: 6, columns: 4, weightDecay: false, initialization: .zeros)
        let gate = TestGates.base(centroids: centroids, epsilon: 0.0078125)
        gate.initializeState(seed: 1, layer: 0)
        let x = randomTensor(rows: 32, columns: 6, seed: 3)
        let routing = Routing<Double>()
        try gate.forward(x.pointer, rows: 32, context: context(rows: 32), into: routing)
        XCTAssertEqual(counts(routing, experts: 4), [8, 8, 8, 8])
        XCTAssertEqual(routing.tokens.map(Int.init).sorted(), Array(0..<32), "each token exactly once")
        // Orthogonal centroids of norm 0.1.
        for a in 0..<4 { for b in 0..<4 {
            let dot = (0..<6).reduce(0.0) { $0 + centroids.value[$1 * 4 + a] * centroids.value[$1 * 4 + b] }
            XCTAssertEqual(dot, a == b ? 0.01 : 0, accuracy: 1e-12)
        } }
        // Against brute force on 8 tokens, 2 experts: within N * eps of the optimum.
        let key = RandomKey(9)
        let scores = (0..<16).map { key.normal($0) }
        let owners = BalancedAssignment.solve(scores: scores, tokens: 8, experts: 2, epsilon: 1.0 / 1024)
        XCTAssertEqual(owners.filter { $0 == 0 }.count, 4)
        let value = (0..<8).reduce(0.0) { $0 + scores[$1 * 2 + owners[$1]] }
        var best = -Double.infinity
        for mask in 0..<256 where mask.nonzeroBitCount == 4 {
            best = max(best, (0..<8).reduce(0.0) { $0 + scores[$1 * 2 + ((mask >> $1) & 1)] })
        }
        // Within N (ε + grid) of the optimum.
        XCTAssertGreaterThanOrEqual(value, best - 8 * (2.0 / 1024))
    }

    /// N = 10 tokens over E = 4 experts (not a multiple): the global problem is padded to 12
    /// rows with constant-score dummies, so every real token gets exactly one expert, no expert
    /// more than ceil(N/E) = 3 tokens, and 2 ranks of 5 tokens assign exactly as 1 rank of 10.
    func testBaseWithTokensNotAMultipleOfTheExperts() throws {
        final class Box: @unchecked Sendable { var experts: [[Int32]] = [[], []]; var kept: [Int64] = [] }
        func assign(ranks: Int) throws -> ([Int32], [Int64]) {
            let box = Box()
            let x = randomTensor(rows: 10, columns: 6, seed: 4)
            try ThreadedCommunicator.run(size: ranks) { comm in
                let store = ParameterStore<Double, Replicated>()
                let gate = TestGates.base(centroids: store.add(ParameterPath("c", role: .routingTable), rows: 6, columns: 4, weightDecay: false, initialization: .zeros),
                                          epsilon: 0.0078125)
                gate.initializeState(seed: 1, layer: 0)
                let rows = 10 / ranks, first = comm.rank * rows
                let routing = Routing<Double>()
                let context = RoutingContext(training: true, communicator: comm, globalTokens: 10, firstGlobalToken: first,
                                             tokenIds: nil, noiseKey: RandomKey(5))
                try gate.forward(x.pointer + first * 6, rows: rows, context: context, into: routing)
                guard routing.tokens.map(Int.init) == Array(0..<rows) else { throw TestFailure("rank \(comm.rank): \(routing.tokens)") }
                box.experts[comm.rank] = routing.experts
                if comm.rank == 0 { box.kept = routing.keptPerExpert }
            }
            return (box.experts.flatMap { $0 }, box.kept)
        }
        let (single, kept) = try assign(ranks: 1)
        var counts = [Int64](repeating: 0, count: 4)
        for e in single { counts[Int(e)] += 1 }
        XCTAssertEqual(single.count, 10, "every real token is assigned once")
        XCTAssertTrue(counts.allSatisfy { $0 <= 3 }, "no expert above ceil(N/E): \(counts)")
        XCTAssertEqual(kept, counts, "the global counts the dispatch checks against")
        XCTAssertEqual(try assign(ranks: 2).0, single, "2 ranks assign as 1")
    }

    func testHashRoutingDependsOnlyOnTheTokenIdAndBalancedTablesAreBalanced() throws {
        let store = ParameterStore<Double, Replicated>()
        let table = store.add(ParameterPath("t", role: .routingTable), rows: 1, columns: 50, weightDecay: false, initialization: .zeros)
        let frequencies = (0..<50).map { ($0 * 37) % 23 }
        let gate = TestGates.hash(table: table, expertCount: 4, balancedBy: frequencies)
        gate.initializeState(seed: 1, layer: 0)
        var mass = [Int](repeating: 0, count: 4)
        for v in 0..<50 { mass[Int(table.value[v])] += frequencies[v] }
        XCTAssertLessThanOrEqual(mass.max()! - mass.min()!, frequencies.max()!)
        let ids: [Int32] = [3, 7, 3, 49, 0, 7]
        let first = Routing<Double>(), second = Routing<Double>()
        try ids.withUnsafeBufferPointer { pointer in
            try gate.forward(randomTensor(rows: 6, columns: 4, seed: 1).pointer, rows: 6, context: context(rows: 6, tokenIds: pointer.baseAddress), into: first)
            try gate.forward(randomTensor(rows: 6, columns: 4, seed: 2).pointer, rows: 6, context: context(rows: 6, tokenIds: pointer.baseAddress, step: 9, noise: 7), into: second)
        }
        XCTAssertEqual(first.experts, second.experts, "other hidden states, step and noise: same routing")
        XCTAssertEqual(first.experts[0], first.experts[2])
        XCTAssertEqual(first.weights, Array(repeating: 1, count: 6))
    }

    func testExpertChoiceFillsEveryExpertExactly() throws {
        let store = ParameterStore<Double, Replicated>()
        let router = store.add(ParameterPath("r", role: .router), rows: 5, columns: 4, weightDecay: false, initialization: .normal(standardDeviation: 1))
        store.initialize(key: RandomKey(2))
        let gate = TestGates.expertChoice(router: router, capacityFactor: 2)
        let routing = Routing<Double>()
        try gate.forward(randomTensor(rows: 20, columns: 5, seed: 4).pointer, rows: 20, context: context(rows: 20), into: routing)
        XCTAssertEqual(counts(routing, experts: 4), [10, 10, 10, 10], "C = ceil(20 * 2 / 4)")
    }

    func dtsGate(tauMax: Double, hardStep: Int?, store: ParameterStore<Double, Replicated>) -> (gate: Gate<Double>, router: Parameter<Double, Replicated>) {
        let router = store.add(ParameterPath("r\(store.entries.count)", role: .router), rows: 5, columns: 8, weightDecay: false, initialization: .normal(standardDeviation: 1))
        store.initialize(key: RandomKey(3))
        let schedule = TemperatureSchedule(kind: .linear, maximum: tauMax, minimum: 0.05, annealSteps: 100, hardStep: hardStep, startStep: 0)
        return (TestGates.denseToSparse(router: router, bias: nil, transform: .gumbelSoftmax(weightsFromGumbel: false), schedule: schedule,
                                        threshold: 0.001, auxiliaryCoefficient: 0.01), router)
    }

    /// DTS: (nearly) all experts at the start, fewer as τ anneals (monotone on fixed logits and
    /// noise), exactly one after the hard switch; at τ = 1e4 all are selected, L_aux = λ E and
    /// its router gradient is zero.
    func testDenseToSparseAnnealsFromDenseToOneExpert() throws {
        let store = ParameterStore<Double, Replicated>()
        let gate = dtsGate(tauMax: 2, hardStep: 120, store: store).gate
        let x = randomTensor(rows: 64, columns: 5, seed: 5)
        var previous = Double.infinity, means: [Double] = []
        for step in stride(from: 0, through: 140, by: 20) {
            let routing = Routing<Double>()
            try gate.forward(x.pointer, rows: 64, context: context(rows: 64, step: step), into: routing)
            let mean = Double(routing.count) / 64
            means.append(mean)
            XCTAssertLessThanOrEqual(mean, previous + 1e-12, "active experts never rise as τ falls: \(means)")
            previous = mean
        }
        XCTAssertGreaterThan(means[0], 7, "τ = 2 starts (nearly) dense: \(means)")
        XCTAssertEqual(means.last!, 1, "hard top-1 after H")
        let (hot, hotRouter) = dtsGate(tauMax: 1e4, hardStep: nil, store: store)
        let routing = Routing<Double>()
        try hot.forward(x.pointer, rows: 64, context: context(rows: 64), into: routing)
        XCTAssertEqual(routing.count, 64 * 8)
        XCTAssertEqual(routing.auxiliaryLoss, 0.01 * 8 * 1, accuracy: 1e-12, "λ E Σ me ce with ce = 1 and Σ me = 1")
        // Gradient of L_aux alone (dw = 0): zero on the router.
        store.zeroGradients()
        let dx = Tensor<Double>(rows: 64, columns: 5)
        var zeros = [Double](repeating: 0, count: routing.count)
        hot.backward(x.pointer, rows: 64, dWeights: &zeros, dx: dx.pointer, routing: routing)
        for index in 0..<hotRouter.count { XCTAssertEqual(hotRouter.gradient[index], 0, accuracy: 1e-15) }
    }

    func testActivationGateBreaksTheTemperatureSymmetryAndHasItsLowerBound() throws {
        func weights(scale: Double, tau: Double) throws -> [Double] {
            let store = ParameterStore<Double, Replicated>()
            let router = store.add(ParameterPath("r", role: .router), rows: 5, columns: 8, weightDecay: false, initialization: .normal(standardDeviation: 1))
            let bias = store.add(ParameterPath("b", role: .routerBias), rows: 1, columns: 8, weightDecay: false, initialization: .normal(standardDeviation: 1))
            store.initialize(key: RandomKey(3))
            for index in 0..<store.count { store.values[index] *= scale }
            let schedule = TemperatureSchedule(kind: .constant, maximum: tau, minimum: tau, annealSteps: 1, hardStep: nil, startStep: 0)
            let gate = TestGates.denseToSparse(router: router, bias: bias, transform: .activation(tanh: false), schedule: schedule,
                                               threshold: 0.001, auxiliaryCoefficient: 0)
            let routing = Routing<Double>()
            try gate.forward(randomTensor(rows: 16, columns: 5, seed: 8).pointer, rows: 16, context: context(rows: 16), into: routing)
            XCTAssertEqual(routing.count, 16 * 8, "every expert is selected at a high temperature")
            let bound = 1 / (1 + 7 * exp(1 / tau))
            for weight in routing.weights { XCTAssertGreaterThanOrEqual(weight, bound - 1e-12) }
            return routing.weights
        }
        let base = try weights(scale: 1, tau: 1), scaled = try weights(scale: 2, tau: 2)
        XCTAssertGreaterThan(zip(base, scaled).map { abs($0 - $1) }.max()!, 1e-3, "(W, b, τ) -> 2 (W, b, τ) changes G")
    }

    func testGShardWeightsSumToOneAndFirstChoicesFillFirst() throws {
        let store = ParameterStore<Double, Replicated>()
        let router = store.add(ParameterPath("r", role: .router), rows: 5, columns: 4, weightDecay: false, initialization: .normal(standardDeviation: 1))
        store.initialize(key: RandomKey(6))
        for policy in SecondChoicePolicy.allCases {
            let (gate, selection) = TestGates.topK(router: router, k: 2, renormalization: .afterDrop, capacityFactor: 0.6, evalCapacityFactor: 1,
                                                   minimumCapacity: 1, balanceCoefficient: 0.01, zLossCoefficient: 0, secondChoice: policy)
            let routing = Routing<Double>()
            try gate.forward(randomTensor(rows: 40, columns: 5, seed: 7).pointer, rows: 40, context: context(rows: 40), into: routing)
            var sums = [Double](repeating: 0, count: 40)
            for j in 0..<routing.count { sums[Int(routing.tokens[j])] += routing.weights[j] }
            for sum in sums { XCTAssertTrue(abs(sum - 1) < 1e-12 || sum == 0, "\(policy): weights sum to \(sum)") }
            // An expert that kept any second choice kept all its first choices.
            for e in 0..<4 {
                let firsts = (0..<40).filter { Int(selection.selectedExpert[$0 * 2]) == e }
                let secondsKept = (0..<40).filter { Int(selection.selectedExpert[$0 * 2 + 1]) == e && selection.keptIndex[$0 * 2 + 1] >= 0 }
                if !secondsKept.isEmpty { XCTAssertTrue(firsts.allSatisfy { selection.keptIndex[$0 * 2] >= 0 }, "\(policy) expert \(e)") }
            }
        }
    }
}
