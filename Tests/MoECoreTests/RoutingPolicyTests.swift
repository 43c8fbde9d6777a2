import XCTest
@testable import MoECore
import MoEComm
import MoEIO

/// DeepSeek-V3's routing on the topk gate (docs/ALGORITHMS.md 11): sigmoid affinities, the
/// routed scale, group-limited selection and loss-free balancing's bias, on standalone gates.
final class RoutingPolicyTests: XCTestCase {
    let communicator = SingleRankCommunicator()
    let store = ParameterStore<Double, Replicated>()
    lazy var router = store.add(ParameterPath("r", role: .router), rows: 6, columns: 8, weightDecay: false,
                                initialization: .normal(standardDeviation: 1))

    func gate(k: Int = 2, groups: Int = 1, limit: Int = 0, scale: Double = 1, rate: Double = 0,
              renormalization: Renormalization = .beforeDrop) -> (Gate<Double>, TopKPolicy<Double>) {
        store.initialize(key: RandomKey(6))
        var scoring = TopKPolicy<Double>.Scoring()
        (scoring.function, scoring.routedScale, scoring.biasUpdateRate, scoring.groups, scoring.groupLimit) = (.sigmoid, scale, rate, groups, limit)
        let policy = TopKPolicy<Double>(expertCount: 8, k: k, renormalization: renormalization, capacityFactor: nil, evalCapacityFactor: nil,
                                        minimumCapacity: 0, scoring: scoring)
        return (Gate(kind: .topk, expertCount: 8, router: LinearRouter(weight: router), policy: policy), policy)
    }

    func route(_ gate: Gate<Double>, rows: Int = 64) throws -> Routing<Double> {
        let routing = Routing<Double>()
        try gate.forward(randomTensor(rows: rows, columns: 6, seed: 7).pointer, rows: rows,
                         context: RoutingContext(training: true, communicator: communicator, globalTokens: rows, firstGlobalToken: 0,
                                                 tokenIds: nil, noiseKey: RandomKey(1)), into: routing)
        return routing
    }

    /// Normalised over the selected, scaled: every token's weights sum to the routed scale, and
    /// each weight is its sigmoid affinity over the selected ones' sum.
    func testSigmoidWeightsAreNormalisedAffinitiesTimesTheScale() throws {
        let (gate, _) = self.gate(k: 3, scale: 2.5)
        let routing = try route(gate)
        var sums = [Double](repeating: 0, count: 64)
        for j in 0..<routing.count { sums[Int(routing.tokens[j])] += routing.weights[j] }
        for sum in sums { XCTAssertEqual(sum, 2.5, accuracy: 1e-12) }
        let a = gate.scores.affinities, first = (0..<routing.count).filter { routing.tokens[$0] == 0 }
        let total = first.reduce(0.0) { $0 + a[0, Int(routing.experts[$1])] }
        for j in first { XCTAssertEqual(routing.weights[j], 2.5 * a[0, Int(routing.experts[j])] / total, accuracy: 1e-12) }
        XCTAssertEqual(1 / (1 + exp(-gate.scores.logits[0, 0])), a[0, 0], accuracy: 1e-15)
    }

    /// 8 experts in 4 groups (a group per rank on 4 ranks of 2 experts each): with a limit of one
    /// group every token's experts share one group, hence one rank; with two, at most two groups,
    /// the two whose best two affinities sum highest.
    func testGroupLimitedSelectionStaysInsideTheBestGroups() throws {
        for limit in [1, 2] {
            let (gate, _) = self.gate(k: 2, groups: 4, limit: limit)
            let routing = try route(gate)
            let placement = try ExpertPlacement(expertCount: 8, rankCount: 4, rank: 0)
            for token in 0..<64 {
                let experts = (0..<routing.count).filter { routing.tokens[$0] == Int32(token) }.map { Int(routing.experts[$0]) }
                XCTAssertEqual(experts.count, 2)
                let ranks = Set(experts.map { placement.owner(of: $0) })
                XCTAssertLessThanOrEqual(ranks.count, limit, "token \(token): experts \(experts)")
                // The allowed groups are the best by their top-two sums (each group holds two).
                let a = gate.scores.affinities
                let groupScores = (0..<4).map { a[token, 2 * $0] + a[token, 2 * $0 + 1] }
                let best = Set((0..<4).sorted { groupScores[$0] > groupScores[$1] }.prefix(limit))
                XCTAssertTrue(experts.allSatisfy { best.contains($0 / 2) }, "token \(token): \(experts) outside groups \(best)")
            }
        }
    }

    /// The bias decides which experts are chosen, never their weights.
    func testTheBiasSteersSelectionButNotTheWeights() throws {
        let (gate, policy) = self.gate(k: 1, rate: 0.1, renormalization: .none)
        policy.state = ["bias.5": 10]
        let routing = try route(gate)
        XCTAssertTrue(routing.experts.allSatisfy { $0 == 5 }, "a large bias wins every token")
        for j in 0..<routing.count { XCTAssertEqual(routing.weights[j], gate.scores.affinities[Int(routing.tokens[j]), 5], accuracy: 0) }
    }

    /// DeepSeek-V3's sign rule: after an applied update each expert's bias moves by the rate,
    /// down when it selected more than the mean, up when fewer, not at all at the mean; a skipped
    /// update moves nothing, and the state round-trips (checkpoints).
    func testTheBiasMovesOnlyByItsRule() throws {
        let (gate, policy) = self.gate(rate: 0.01)
        var statistics = RoutingStatistics()
        statistics.selectedPerExpert = [30, 2, 16, 16, 16, 16, 16, 16]   // mean 16
        gate.adapt(to: [statistics], own: 0, applied: false)
        XCTAssertEqual(policy.bias, Array(repeating: 0, count: 8), "a skipped update moves nothing")
        gate.adapt(to: [statistics], own: 0, applied: true)
        gate.adapt(to: [statistics], own: 0, applied: true)
        XCTAssertEqual(policy.bias, [-0.02, 0.02, 0, 0, 0, 0, 0, 0], "the overloaded expert's bias falls, the underloaded one's rises")
        let (_, restored) = self.gate(rate: 0.01)
        restored.state = gate.state
        XCTAssertEqual(restored.bias, policy.bias)
        XCTAssertTrue(store.entries.allSatisfy { $0.role == .router }, "the bias is no parameter: no gradient reaches it")
    }
}
