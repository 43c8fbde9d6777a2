import XCTest
@testable import MoECore
import MoEComm
import MoETestSupport

/// The expert-parallel dispatch at the layer (docs/ALGORITHMS.md 12): a token travels once per
/// rank it visits, whatever the exchange groups, and R ranks compute what one rank computes.
/// One MoE layer in Double: 16 experts of a sigmoid top-4 gate in 4 groups (one per rank on 4
/// ranks), dropless, 32 tokens of the global batch split over the ranks.
final class DispatchTests: XCTestCase {
    static let experts = 16, k = 4, tokens = 32, width = 6, hidden = 5

    /// What one rank saw and computed.
    struct RankOutcome {
        var y: [Double] = [], dx: [Double] = []
        var routerGradient: [Double] = []
        var expertGradients: [String: [Double]] = [:]
        var sentUnits = 0, tokenRankPairs = 0, tokensRouted = 0
        var bytesSent = 0.0
        /// The layer's profile of the forward and backward, and their wall time.
        var profile = StepProfile(), seconds = 0.0
    }

    /// One forward and backward of the layer on `ranks` thread-ranks; outcomes by rank.
    static func run(ranks: Int, chunks: Int, groupLimit: Int) throws -> [RankOutcome] {
        final class Collector: @unchecked Sendable {
            var outcomes: [RankOutcome]
            let lock = NSLock()
            init(_ count: Int) { outcomes = Array(repeating: RankOutcome(), count: count) }
        }
        let collector = Collector(ranks)
        try ThreadedCommunicator.run(size: ranks) { comm in
            let outcome = try runRank(comm, ranks: ranks, chunks: chunks, groupLimit: groupLimit)
            collector.lock.lock()
            collector.outcomes[comm.rank] = outcome
            collector.lock.unlock()
        }
        return collector.outcomes
    }

    static func runRank(_ comm: Communicator, ranks: Int, chunks: Int, groupLimit: Int) throws -> RankOutcome {
        let replicated = ParameterStore<Double, Replicated>(), expertStore = ParameterStore<Double, ExpertSharded>()
        let router = replicated.add(ParameterPath("router", role: .router), rows: width, columns: experts, weightDecay: false,
                                    initialization: .normal(standardDeviation: 0.8))
        var scoring = TopKPolicy<Double>.Scoring()
        (scoring.function, scoring.groups, scoring.groupLimit) = (.sigmoid, 4, groupLimit)
        let policy = TopKPolicy<Double>(expertCount: experts, k: k, renormalization: .beforeDrop, capacityFactor: nil,
                                        evalCapacityFactor: nil, minimumCapacity: 0, scoring: scoring)
        let gate = Gate(kind: .topk, expertCount: experts, router: LinearRouter(weight: router), policy: policy)
        let placement = try ExpertPlacement(expertCount: experts, rankCount: ranks, rank: comm.rank)
        let ffns = placement.localExperts.map {
            FeedForward(store: expertStore, path: ParameterPath("experts.\($0)", role: .expert), width: width, hiddenSize: hidden,
                        residualDeviation: 0.5)
        }
        let layer = MoELayer(gate: gate, experts: ffns, placement: placement, communicator: comm)
        layer.dispatchChunks = chunks
        replicated.initialize(key: RandomKey(21))
        expertStore.initialize(key: RandomKey(22))

        let rows = tokens / ranks, first = comm.rank * rows
        let x = slice(randomTensor(rows: tokens, columns: width, seed: 23), first: first, rows: rows)
        let dy = slice(randomTensor(rows: tokens, columns: width, seed: 24), first: first, rows: rows)
        let y = Tensor<Double>(rows: rows, columns: width), dx = Tensor<Double>(rows: rows, columns: width)
        let context = RoutingContext(training: true, communicator: comm, globalTokens: tokens, firstGlobalToken: first,
                                     tokenIds: nil, noiseKey: RandomKey(5))
        let started = Clock.nanoseconds()
        try layer.forward(x.pointer, rows: rows, into: y.pointer, context: context)
        try layer.backward(x.pointer, dy.pointer, rows: rows, dx: dx.pointer)
        let seconds = Double(Clock.nanoseconds() - started) * 1e-9

        var outcome = RankOutcome(y: y.array, dx: dx.array, routerGradient: Array(UnsafeBufferPointer(start: router.gradient, count: router.count)))
        for entry in expertStore.entries {
            outcome.expertGradients[entry.name] = Array(UnsafeBufferPointer(start: expertStore.gradients + entry.offset, count: entry.count))
        }
        let routing = layer.routing
        outcome.tokenRankPairs = Set((0..<routing.count).map { Int(routing.tokens[$0]) * ranks + placement.owner(of: Int(routing.experts[$0])) }).count
        outcome.tokensRouted = Set(routing.tokens).count
        outcome.sentUnits = layer.plan.sentUnitCount
        outcome.bytesSent = layer.profile.expertBytesSent
        (outcome.profile, outcome.seconds) = (layer.profile, seconds)
        return outcome
    }

    static func slice(_ tensor: Tensor<Double>, first: Int, rows: Int) -> Tensor<Double> {
        Tensor(rows: rows, columns: tensor.columns, values: Array(tensor.array[(first * tensor.columns)..<((first + rows) * tensor.columns)]))
    }

    /// A token's rows cross to each rank it visits once: the units sent are the distinct
    /// (token, rank) pairs, not the assignments; limited to one group (= one rank) a token is one
    /// row, and the bytes each rank sends fall with the limit.
    func testATokenTravelsOncePerRankItVisits() throws {
        var bytes: [Int: Double] = [:]
        for limit in [1, 2, 0] {
            let outcomes = try Self.run(ranks: 4, chunks: 1, groupLimit: limit)
            for (rank, outcome) in outcomes.enumerated() {
                XCTAssertEqual(outcome.sentUnits, outcome.tokenRankPairs, "limit \(limit), rank \(rank)")
                XCTAssertLessThan(outcome.sentUnits, Self.k * Self.tokens / 4, "fewer rows than assignments (limit \(limit), rank \(rank))")
                if limit == 1 { XCTAssertEqual(outcome.sentUnits, outcome.tokensRouted, "one row per token (rank \(rank))") }
                if limit == 2 { XCTAssertLessThanOrEqual(outcome.sentUnits, 2 * outcome.tokensRouted) }
            }
            bytes[limit] = outcomes.reduce(0) { $0 + $1.bytesSent }
        }
        XCTAssertLessThan(bytes[1]!, bytes[2]!, "bytes with one group against two: \(bytes)")
        XCTAssertLessThan(bytes[2]!, bytes[0]!, "bytes with two groups against any: \(bytes)")
    }

    /// Exchange groups change when rows travel, not what is computed: with 1, 2 and 4 groups of
    /// the 4 local experts (a token's experts on one rank often span groups, so its row leaves
    /// with its first group and its sum returns with its last) outputs and every gradient are
    /// bitwise those of one exchange.
    func testExchangeGroupsComputeBitwiseWhatOneExchangeComputes() throws {
        for limit in [1, 0] {
            let single = try Self.run(ranks: 4, chunks: 1, groupLimit: limit)
            for chunks in [2, 4] {
                let grouped = try Self.run(ranks: 4, chunks: chunks, groupLimit: limit)
                for rank in 0..<4 {
                    let label = "limit \(limit), \(chunks) groups, rank \(rank)"
                    XCTAssertEqual(single[rank].y, grouped[rank].y, label)
                    XCTAssertEqual(single[rank].dx, grouped[rank].dx, label)
                    XCTAssertEqual(single[rank].routerGradient, grouped[rank].routerGradient, label)
                    XCTAssertEqual(single[rank].expertGradients, grouped[rank].expertGradients, label)
                }
            }
        }
    }

    /// 4 ranks compute what one rank computes over the whole batch: the outputs and input
    /// gradients row for row, the router's gradient summed over ranks, each expert's gradient on
    /// its host (Double: only summation order differs).
    func testFourRanksComputeWhatOneRankComputes() throws {
        for limit in [1, 2, 0] {
            let one = try Self.run(ranks: 1, chunks: 1, groupLimit: limit)[0]
            let four = try Self.run(ranks: 4, chunks: 2, groupLimit: limit)
            assertClose(one.y, four.flatMap(\.y), "y, limit \(limit)")
            assertClose(one.dx, four.flatMap(\.dx), "dx, limit \(limit)")
            let routerSum = four.dropFirst().reduce(four[0].routerGradient) { zip($0, $1.routerGradient).map { $0 + $1 } }
            assertClose(one.routerGradient, routerSum, "router gradient, limit \(limit)")
            for outcome in four {
                for (name, gradient) in outcome.expertGradients { assertClose(one.expertGradients[name] ?? [], gradient, "\(name), limit \(limit)") }
            }
        }
    }

    /// The profile counts each second once: a backward exchange's wait (left after the deferred
    /// weight gradients) is `waiting`, not also part of the stage that waited. Every exchange
    /// here takes 20 ms to finish, so counting a wait twice overshoots the wall time by 40 ms.
    func testAWaitIsCountedOnceInTheProfile() throws {
        let outcome = try Self.runRank(SlowExchangeCommunicator(finishing: 0.02), ranks: 1, chunks: 1, groupLimit: 0)
        let profile = outcome.profile, parts = profile.moe + profile.waiting
        XCTAssertGreaterThanOrEqual(profile.waitingInBackward, 0.035, "both backward exchanges waited")
        XCTAssertLessThanOrEqual(parts, outcome.seconds + 0.002,
                                 "stages \(profile.moe * 1e3) ms + waiting \(profile.waiting * 1e3) ms in \(outcome.seconds * 1e3) ms")
        XCTAssertGreaterThanOrEqual(profile.dispatch + profile.combine, 0.035, "the forward exchanges' waits are the stages' own")
    }

    func assertClose(_ a: [Double], _ b: [Double], _ label: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, label, file: file, line: line)
        let worst = zip(a, b).map { abs($0 - $1) / max(1, abs($0)) }.max() ?? 0
        XCTAssertLessThan(worst, 1e-12, label, file: file, line: line)
        XCTAssertTrue(a.contains { $0 != 0 }, "\(label) is not all zero", file: file, line: line)
    }
}

/// One rank whose started exchanges take `finishing` seconds to complete (a peer still busy):
/// `finish` blocks that long, `progress` never completes them.
final class SlowExchangeCommunicator: Communicator {
    let base = SingleRankCommunicator(), finishing: Double
    init(finishing: Double) { self.finishing = finishing }
    var rank: Int { 0 }
    var size: Int { 1 }
    func allReduce(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, op: ReduceOp) throws {}
    func exclusiveScanSum(_ buffer: UnsafeMutableBufferPointer<Int64>) throws { try base.exclusiveScanSum(buffer) }
    func allToAll(send: UnsafeBufferPointer<Int64>, recv: UnsafeMutableBufferPointer<Int64>, blockCount: Int) throws {
        try base.allToAll(send: send, recv: recv, blockCount: blockCount)
    }
    func allToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                   recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int]) throws {
        try base.allToAllV(send: send, sendCounts: sendCounts, sendOffsets: sendOffsets, recv: recv, recvCounts: recvCounts, recvOffsets: recvOffsets)
    }
    func startAllToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                        recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int], in transfer: PendingTransfer) throws {
        try allToAllV(send: send, sendCounts: sendCounts, sendOffsets: sendOffsets, recv: recv, recvCounts: recvCounts, recvOffsets: recvOffsets)
        transfer.handle = OpaquePointer(bitPattern: 1)
    }
    func finish(_ transfer: PendingTransfer) throws {
        guard transfer.handle != nil else { return }
        Thread.sleep(forTimeInterval: finishing)
        transfer.handle = nil
    }
    func reduceScatterSum(_ buffer: UnsafeMutableRawBufferPointer, blockCounts: [Int], type: CommDataType) throws {}
    func allGather(_ buffer: UnsafeMutableRawBufferPointer, blockByteCounts: [Int]) throws {}
    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {}
    func barrier() throws {}
    func split(color: Int, key: Int) throws -> Communicator { self }
    func abort(code: Int32) -> Never { base.abort(code: code) }
}
