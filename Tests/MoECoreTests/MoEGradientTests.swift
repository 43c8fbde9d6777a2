import XCTest
import MoECore
import MoEComm
import MoEIO

/// A standalone MoE layer in Double with its own parameter stores.
final class MoEFixture {
    let replicated = ParameterStore<Double, Replicated>()
    let expertStore = ParameterStore<Double, ExpertSharded>()
    let layer: MoELayer<Double>
    let gate: Gate<Double>
    let policy: TopKPolicy<Double>
    let router: Parameter<Double, Replicated>
    let rows: Int, width: Int
    let communicator = SingleRankCommunicator()

    init(experts: Int, k: Int, renormalization: Renormalization, capacityFactor: Double?, rows: Int = 12, width: Int = 6,
         hidden: Int = 5, balance: Double = 0.01, zLoss: Double = 0.001, minimumCapacity: Int = 1) throws {
        self.rows = rows
        self.width = width
        let router = replicated.add(ParameterPath("router", role: .router), rows: width, columns: experts, weightDecay: false,
                                    initialization: .normal(standardDeviation: 0.8))
        self.router = router
        (gate, policy) = TestGates.topK(router: router, k: k, renormalization: renormalization, capacityFactor: capacityFactor,
                                        evalCapacityFactor: capacityFactor, minimumCapacity: minimumCapacity,
                                        balanceCoefficient: balance, zLossCoefficient: zLoss)
        let placement = try ExpertPlacement(expertCount: experts, rankCount: 1, rank: 0)
        let store = expertStore
        let ffns = (0..<experts).map {
            FeedForward(store: store, path: ParameterPath("experts.\($0)", role: .expert), width: width, hiddenSize: hidden, residualDeviation: 0.5)
        }
        layer = MoELayer(gate: gate, experts: ffns, placement: placement, communicator: communicator)
        replicated.initialize(key: RandomKey(21))
        expertStore.initialize(key: RandomKey(22))
        for entry in expertStore.entries where entry.name.hasSuffix("bias") {
            for i in 0..<entry.count { expertStore.values[entry.offset + i] = 0.1 * Double(i % 3) - 0.05 }
        }
    }

    func context() -> RoutingContext {
        RoutingContext(training: true, communicator: communicator, globalTokens: rows, firstGlobalToken: 0,
                       tokenIds: nil, noiseKey: RandomKey(5))
    }

    /// Σ y ⊙ R + auxiliary loss.
    func loss(_ x: Tensor<Double>, _ projection: Tensor<Double>, _ y: Tensor<Double>) throws -> Double {
        try layer.forward(x.pointer, rows: rows, into: y.pointer, context: context())
        return projectedLoss(y, projection) + layer.routing.auxiliaryLoss
    }
}

final class MoEGradientTests: XCTestCase {
    let checker = GradientChecker()

    func checkMoE(experts: Int, k: Int, renormalization: Renormalization, capacityFactor: Double?,
                  expectDrops: Bool, file: StaticString = #filePath, line: UInt = #line) throws {
        let fixture = try MoEFixture(experts: experts, k: k, renormalization: renormalization, capacityFactor: capacityFactor)
        let x = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 23)
        let projection = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 24)
        let y = Tensor<Double>(rows: fixture.rows, columns: fixture.width)
        let dx = Tensor<Double>(rows: fixture.rows, columns: fixture.width)
        _ = try fixture.loss(x, projection, y)
        let routing = fixture.layer.routing
        if expectDrops {
            XCTAssertLessThan(routing.keptCount, routing.selectedCount, "the case must exercise dropping", file: file, line: line)
        } else {
            XCTAssertEqual(routing.keptCount, routing.selectedCount, file: file, line: line)
        }
        try fixture.layer.backward(x.pointer, projection.pointer, rows: fixture.rows, dx: dx.pointer)
        let loss = { try fixture.loss(x, projection, y) }
        try checker.check("router", values: fixture.router.value, gradients: fixture.router.gradient,
                          count: fixture.router.count, loss: loss, file: file, line: line)
        for entry in fixture.expertStore.entries {
            try checker.check(entry.name, values: fixture.expertStore.values + entry.offset,
                              gradients: fixture.expertStore.gradients + entry.offset, count: entry.count, loss: loss,
                              file: file, line: line)
        }
        try checker.check("x", values: x.pointer, gradients: dx.pointer, count: x.count, loss: loss, file: file, line: line)
    }

    func testTop2BeforeDropDropless() throws {
        try checkMoE(experts: 4, k: 2, renormalization: .beforeDrop, capacityFactor: nil, expectDrops: false)
    }

    func testTop2BeforeDropWithCapacity() throws {
        try checkMoE(experts: 4, k: 2, renormalization: .beforeDrop, capacityFactor: 0.5, expectDrops: true)
    }

    func testTop2AfterDropWithCapacity() throws {
        try checkMoE(experts: 4, k: 2, renormalization: .afterDrop, capacityFactor: 0.5, expectDrops: true)
    }

    func testSwitchRawProbabilities() throws {
        try checkMoE(experts: 3, k: 1, renormalization: .none, capacityFactor: 0.7, expectDrops: true)
    }

    func testTop3NoneDropless() throws {
        try checkMoE(experts: 5, k: 3, renormalization: .none, capacityFactor: nil, expectDrops: false)
    }

    /// docs/ALGORITHMS.md 3: B = 1 when f is uniform, and Z = (ln E)² when the router is zero.
    func testAuxiliaryLossIdentities() throws {
        let fixture = try MoEFixture(experts: 4, k: 1, renormalization: .none, capacityFactor: nil, rows: 8,
                                     balance: 1, zLoss: 0)
        fixture.router.value.update(repeating: 0, count: fixture.router.count)
        let x = randomTensor(rows: 8, columns: fixture.width, seed: 30)
        let y = Tensor<Double>(rows: 8, columns: fixture.width)
        try fixture.layer.forward(x.pointer, rows: 8, into: y.pointer, context: fixture.context())
        XCTAssertEqual(fixture.layer.routing.auxiliaryLoss, 1, accuracy: 1e-12, "uniform p gives B = 1")
        let zFixture = try MoEFixture(experts: 4, k: 1, renormalization: .none, capacityFactor: nil, rows: 8,
                                      balance: 0, zLoss: 1)
        zFixture.router.value.update(repeating: 0, count: zFixture.router.count)
        try zFixture.layer.forward(x.pointer, rows: 8, into: y.pointer, context: zFixture.context())
        XCTAssertEqual(zFixture.layer.routing.auxiliaryLoss, log(4) * log(4), accuracy: 1e-12)
    }

    /// GShard slot order: all first choices take slots before any second choice, so no expert
    /// keeps a second choice while dropping a first choice, and kept weights sum to 1 (or 0).
    func testCapacityOrderAndWeights() throws {
        let fixture = try MoEFixture(experts: 4, k: 2, renormalization: .afterDrop, capacityFactor: 0.6, rows: 40)
        let x = randomTensor(rows: 40, columns: fixture.width, seed: 31)
        let y = Tensor<Double>(rows: 40, columns: fixture.width)
        y.pointer.update(repeating: 7, count: y.count)   // forward overwrites y, whatever it held
        try fixture.layer.forward(x.pointer, rows: 40, into: y.pointer, context: fixture.context())
        let routing = fixture.layer.routing
        let capacity = fixture.policy.capacity(globalTokens: 40, training: true)!
        XCTAssertEqual(capacity, 12)   // ceil(2 * 0.6 * 40 / 4)
        var perExpert = [Int](repeating: 0, count: 4), weightSums = [Double](repeating: 0, count: 40)
        for j in 0..<routing.count {
            perExpert[Int(routing.experts[j])] += 1
            weightSums[Int(routing.tokens[j])] += routing.weights[j]
        }
        XCTAssertTrue(perExpert.allSatisfy { $0 <= capacity })
        XCTAssertEqual(perExpert.map(Int64.init), routing.keptPerExpert)
        for sum in weightSums { XCTAssertTrue(abs(sum - 1) < 1e-12 || sum == 0, "weights sum to \(sum)") }
        XCTAssertLessThan(routing.keptCount, routing.selectedCount)
        // A token whose every assignment was dropped gets a zero output (the residual carries it).
        let dropped = (0..<40).filter { weightSums[$0] == 0 }
        XCTAssertFalse(dropped.isEmpty, "the case must drop some token entirely")
        for token in dropped {
            XCTAssertEqual(Array(UnsafeBufferPointer(start: y.row(token), count: fixture.width)), Array(repeating: 0, count: fixture.width))
        }
    }

    /// Dropless: each expert's row count equals its selection count; counts sum to k*N.
    func testDroplessCounts() throws {
        let fixture = try MoEFixture(experts: 4, k: 2, renormalization: .beforeDrop, capacityFactor: nil, rows: 30)
        let x = randomTensor(rows: 30, columns: fixture.width, seed: 32)
        let y = Tensor<Double>(rows: 30, columns: fixture.width)
        try fixture.layer.forward(x.pointer, rows: 30, into: y.pointer, context: fixture.context())
        XCTAssertEqual(fixture.layer.routing.keptPerExpert.reduce(0, +), 60)
        XCTAssertEqual(fixture.layer.routing.count, 60)
    }

    /// One expert with top-1 and no capacity limit is exactly the dense FFN, forward and backward.
    /// After an update that read the experts' weight gradients without zeroing them
    /// (`expectOverwrittenWeightGradients`), the next backward overwrites each expert's weight
    /// gradient and `settleWeightGradients` zeroes those of experts that got no rows: the
    /// gradients equal a backward into zeroed ones, bit for bit, though the weight entries held
    /// garbage before it. Top-1 over 8 experts and 12 tokens leaves some expert without rows.
    func testOverwrittenWeightGradientsEqualFreshOnes() throws {
        let fixture = try MoEFixture(experts: 8, k: 1, renormalization: .none, capacityFactor: nil)
        let x = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 41)
        let dy = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 42)
        let y = Tensor<Double>(rows: fixture.rows, columns: fixture.width), dx = Tensor<Double>(rows: fixture.rows, columns: fixture.width)
        let store = fixture.expertStore
        func gradients() throws -> [Double] {
            try fixture.layer.forward(x.pointer, rows: fixture.rows, into: y.pointer, context: fixture.context())
            try fixture.layer.backward(x.pointer, dy.pointer, rows: fixture.rows, dx: dx.pointer)
            fixture.layer.settleWeightGradients()
            return Array(UnsafeBufferPointer(start: store.gradients, count: store.count))
        }
        store.zeroGradients()
        let fresh = try gradients()
        let rowsPerExpert = (0..<fixture.layer.routing.count).reduce(into: [Int](repeating: 0, count: 8)) { $0[Int(fixture.layer.routing.experts[$1])] += 1 }
        XCTAssertTrue(rowsPerExpert.contains(0), "every expert got rows (\(rowsPerExpert)): pick another seed")
        // Last step's values in the weights' entries; the biases' the optimizer zeroes.
        store.zeroGradients()
        for index in fixture.layer.weightGradientEntries {
            let entry = store.entries[index]
            (store.gradients + entry.offset).update(repeating: 7.5, count: entry.count)
        }
        fixture.layer.expectOverwrittenWeightGradients()
        XCTAssertEqual(try gradients(), fresh)
        XCTAssertEqual(fixture.layer.weightGradientEntries.count, 16, "two weights per expert")
    }

    /// The layer's gradient squares (taken after each weight product, the rest at settling)
    /// equal a pass over the expert store: after a backward that overwrites stale weight
    /// gradients (an expert without rows zeroed), and after one that adds to what the entries
    /// held (an expert without rows keeps it). Once the gradients change they are not offered.
    func testGradientSquaresEqualAPassOverTheStore() throws {
        let fixture = try MoEFixture(experts: 8, k: 1, renormalization: .none, capacityFactor: nil)
        let x = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 41)
        let dy = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 42)
        let y = Tensor<Double>(rows: fixture.rows, columns: fixture.width), dx = Tensor<Double>(rows: fixture.rows, columns: fixture.width)
        let store = fixture.expertStore, layer = fixture.layer
        for overwriting in [true, false] {
            store.zeroGradients()
            for index in layer.weightGradientEntries {
                let entry = store.entries[index]
                (store.gradients + entry.offset).update(repeating: 7.5, count: entry.count)
            }
            if overwriting { layer.expectOverwrittenWeightGradients() }
            XCTAssertNil(layer.gradientSquares, "offered before the backward")
            try layer.forward(x.pointer, rows: fixture.rows, into: y.pointer, context: fixture.context())
            try layer.backward(x.pointer, dy.pointer, rows: fixture.rows, dx: dx.pointer)
            layer.settleWeightGradients()
            let pass = Kernels.sumOfSquares(store.gradients, count: store.count)
            let squares = try XCTUnwrap(layer.gradientSquares)
            XCTAssertEqual(squares.count, store.count)
            XCTAssertEqual(squares.sum, pass, accuracy: 1e-12 * pass, "overwriting: \(overwriting)")
            layer.gradientsChanged()
            XCTAssertNil(layer.gradientSquares)
        }
    }

    func testSingleExpertEqualsDenseFFN() throws {
        let fixture = try MoEFixture(experts: 1, k: 1, renormalization: .none, capacityFactor: nil, balance: 0, zLoss: 0)
        let denseStore = ParameterStore<Double, ExpertSharded>()
        let dense = FeedForward(store: denseStore, path: ParameterPath("experts.0", role: .expert), width: fixture.width, hiddenSize: 5, residualDeviation: 0.5)
        denseStore.values.update(from: fixture.expertStore.values, count: fixture.expertStore.count)
        let x = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 33)
        let dy = randomTensor(rows: fixture.rows, columns: fixture.width, seed: 34)
        let yMoE = Tensor<Double>(rows: fixture.rows, columns: fixture.width), yDense = Tensor<Double>(rows: fixture.rows, columns: fixture.width)
        let dxMoE = Tensor<Double>(rows: fixture.rows, columns: fixture.width), dxDense = Tensor<Double>(rows: fixture.rows, columns: fixture.width)
        try fixture.layer.forward(x.pointer, rows: fixture.rows, into: yMoE.pointer, context: fixture.context())
        try fixture.layer.backward(x.pointer, dy.pointer, rows: fixture.rows, dx: dxMoE.pointer)
        let hidden = FeedForwardStorage<Double>(), scratch = Tensor<Double>(rows: fixture.rows, columns: 5)
        hidden.resize(rows: fixture.rows, for: dense, rounded: false)
        dense.forward(x.pointer, rows: fixture.rows, into: yDense.pointer, hidden: hidden.hidden())
        dense.backward(x.pointer, dy.pointer, rows: fixture.rows, dx: dxDense.pointer, hidden: hidden.hidden(), scratch: scratch.pointer)
        XCTAssertEqual(yMoE.array, yDense.array)
        XCTAssertEqual(dxMoE.array, dxDense.array)
        for index in 0..<denseStore.count { XCTAssertEqual(fixture.expertStore.gradients[index], denseStore.gradients[index]) }
        XCTAssertTrue((0..<fixture.router.count).allSatisfy { fixture.router.gradient[$0] == 0 },
                      "with one expert the router gets no gradient")
    }
}
