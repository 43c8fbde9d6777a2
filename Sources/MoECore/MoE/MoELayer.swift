import MoEComm

/// A mixture-of-experts feed-forward block with expert parallelism (docs/ARCHITECTURE.md).
///
/// Forward, in five stages (megablocks' split; the step profile uses the same names):
///  1. route:    the gate's kept assignments (token s_j, expert e_j, weight w_j)
///  2. plan:     sort them by (owner rank, local expert, token); exchange and check the counts
///  3. dispatch: gather X_send [A, C]; all-to-all-v to the experts' ranks; regroup by local expert
///  4. experts:  each local expert is one FFN over its block of rows
///  5. combine:  regroup by source; all-to-all-v back; y_s = Σ_j w_j Y_back[j] (ascending expert
///               order per token)
/// Backward runs the adjoint of each stage in reverse order. Stages 3-5 run as a pipeline over
/// groups of local experts (`train.dispatch_chunks`): one group's rows travel while the previous
/// group's experts compute, with the same arithmetic as one exchange.
public final class MoELayer<T: Scalar> {
    public let gate: Gate<T>
    /// This rank's experts, indexed by local expert.
    public let experts: [FeedForward<T, ExpertSharded>]
    public let placement: ExpertPlacement
    let communicator: Communicator
    public let routing = Routing<T>()
    var plan = DispatchPlan()
    /// A test's or a benchmark's hooks (nil in production runs).
    public weak var hooks: TrainingHooks?
    /// This layer's index in the model, for error messages.
    public var layerIndex = 0
    /// Time spent since the last `resetProfile()`, by stage.
    public private(set) var profile = StepProfile()
    /// Exchanges per direction (`train.dispatch_chunks`): groups of local experts pipelined
    /// with the experts' compute (at most one group per local expert).
    public var dispatchChunks = 1 { didSet { makeGroups() } }
    /// The local experts in groups of consecutive experts, one exchange each, and each group's
    /// transfer per direction, reused every pass.
    private(set) var groups: [Range<Int>] = []
    private var inbound: [PendingTransfer] = [], outbound: [PendingTransfer] = []

    // Activations [A, C] / [A_recv, C|H].
    let sendBuffer = Tensor<T>(), receiveBuffer = Tensor<T>(), expertInput = Tensor<T>()
    let hidden = FeedForwardStorage<T>(), expertOutput = Tensor<T>()
    let returnedOutput = Tensor<T>()
    // Backward scratch.
    let dSend = Tensor<T>(), dReceive = Tensor<T>(), dExpertOutput = Tensor<T>(), dExpertInput = Tensor<T>()
    let dHidden = Tensor<T>()
    var dWeights: [T] = []

    /// EvoMoE's dense phase: a replicated dense FFN used instead of routing while `isDense`.
    public let dense: FeedForward<T, Replicated>?
    public internal(set) var isDense: Bool
    /// Always-on shared experts added to the routed output (in either phase).
    public let shared: SharedExperts<T>?

    public init(gate: Gate<T>, experts: [FeedForward<T, ExpertSharded>], placement: ExpertPlacement,
                communicator: Communicator, dense: FeedForward<T, Replicated>? = nil, shared: SharedExperts<T>? = nil) {
        precondition(experts.count == placement.expertsPerRank, "one FeedForward per local expert")
        precondition(gate.expertCount == placement.expertCount)
        self.dense = dense
        self.shared = shared
        self.isDense = dense != nil
        self.gate = gate
        self.experts = experts
        self.placement = placement
        self.communicator = communicator
        makeGroups()
    }

    var width: Int { experts[0].width }
    /// Whether the experts' products run in bf16 (their hidden layers keep a bf16 copy).
    var roundsProducts: Bool { experts[0].up.weight.store.matmul?.precision == .bf16 }
    public func resetProfile() { profile = StepProfile() }

    /// Times `body` into `stage`.
    private func measure<R>(_ stage: WritableKeyPath<StepProfile, Double>, _ body: () throws -> R) rethrows -> R {
        let started = Clock.nanoseconds()
        defer { profile[keyPath: stage] += Double(Clock.nanoseconds() - started) * 1e-9 }
        return try body()
    }

    /// The hooks' wait for the slowest rank before an exchange, counted as `waiting`.
    private func waitForSlowestRank() throws {
        if let hooks { profile.waiting += try hooks.waitForSlowestRank(communicator) }
    }

    /// x, y: [N, C]. y is overwritten.
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, context: RoutingContext) throws {
        try forwardRouted(x, rows: rows, into: y, context: context)
        if let shared { measure(\.experts) { shared.forward(x, rows: rows, addingTo: y, rounded: roundsProducts) } }
    }

    /// The routed experts' part of `forward` (or EvoMoE's dense FFN).
    private func forwardRouted(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, context: RoutingContext) throws {
        if isDense, let dense {
            routing.resetDense(globalTokens: context.globalTokens)
            hidden.resize(rows: rows, for: dense, rounded: roundsProducts)
            measure(\.experts) { dense.forward(x, rows: rows, into: y, hidden: hidden.hidden()) }
            return
        }
        try measure(\.route) { try gate.forward(x, rows: rows, context: context, into: routing) }
        try measure(\.plan) {
            try plan.build(routing.experts, placement: placement, communicator: communicator, countError: hooks?.dispatchCountError ?? 0)
            try plan.validate(keptPerExpert: routing.statistics.keptPerExpert, assignments: routing.count, placement: placement,
                              communicator: communicator, layer: layerIndex)
        }
        // The same rows travel again in backward (their gradients).
        profile.expertBytesSent += Double(2 * plan.rowsSentToOtherRanks(rank: communicator.rank) * width * MemoryLayout<T>.stride)
        measure(\.dispatch) { gatherRows(x) }
        try pipeline(forward: true)
        measure(\.combine) { combineReturned(into: y, rows: rows) }
    }

    private func makeGroups() {
        let perRank = placement.expertsPerRank, count = max(1, min(dispatchChunks, perRank))
        groups = (0..<count).map { (($0 * perRank) / count)..<((($0 + 1) * perRank) / count) }
        inbound = groups.map { _ in PendingTransfer() }
        outbound = groups.map { _ in PendingTransfer() }
    }

    /// Stages 3-5 (or their adjoints) as a pipeline over groups of local experts: the rows of
    /// group g+1 travel while group g's experts compute, and each group's results start back as
    /// soon as they are done. Every expert still runs once over all its rows and the combine
    /// runs after all results are back, so the arithmetic is that of one exchange, bit for bit.
    ///   forward:  sendBuffer -> receiveBuffer -> expertInput -> experts -> expertOutput
    ///             -> receiveBuffer -> returnedOutput
    ///   backward: dSend -> dReceive -> dExpertOutput -> experts' adjoint -> dExpertInput
    ///             -> dReceive -> dSend
    private func pipeline(forward: Bool) throws {
        let received = plan.receivedRowCount, width = self.width
        if forward {
            receiveBuffer.resize(rows: received, columns: width)
            expertInput.resize(rows: received, columns: width)
            hidden.resize(rows: received, for: experts[0], rounded: roundsProducts)
            expertOutput.resize(rows: received, columns: width)
            returnedOutput.resize(rows: routing.count, columns: width)
        } else {
            dReceive.resize(rows: received, columns: width)
            dExpertOutput.resize(rows: received, columns: width)
            dExpertInput.resize(rows: received, columns: width, zero: true)
            dHidden.resize(rows: received, columns: experts[0].scratchColumns)
        }
        let (outgoing, incoming) = forward ? (sendBuffer, receiveBuffer) : (dSend, dReceive)
        let (expertsIn, expertsOut) = forward ? (expertInput, expertOutput) : (dExpertOutput, dExpertInput)
        let returned = forward ? returnedOutput : dSend
        try waitForSlowestRank()
        try startExchange(outgoing, into: incoming, reverse: false, group: groups[0], in: inbound[0])
        for (index, group) in groups.enumerated() {
            if index + 1 < groups.count {
                try startExchange(outgoing, into: incoming, reverse: false, group: groups[index + 1], in: inbound[index + 1])
            }
            try measure(\.dispatch) {
                try finishExchange(inbound[index])
                permute(incoming, into: expertsIn, toExpertOrder: true, group: group)
            }
            measure(\.experts) { forward ? runExperts(group) : runExpertsBackward(group) }
            // One group (no pipeline): the benchmark's barrier keeps the slower rank's expert
            // time out of the return exchange, as before the forward one.
            if groups.count == 1 { try waitForSlowestRank() }
            try measure(\.combine) {
                permute(expertsOut, into: incoming, toExpertOrder: false, group: group)
                try startExchange(incoming, into: returned, reverse: true, group: group, in: outbound[index])
                // Lets every transfer in flight move on (those not started this pass are complete).
                try communicator.progress(inbound)
                try communicator.progress(outbound)
            }
        }
        try measure(\.combine) { for transfer in outbound { try finishExchange(transfer) } }
    }

    /// Gathers the rows to send in plan order (token rows of the assignments).
    private func gatherRows(_ x: UnsafePointer<T>) {
        let assignments = routing.count, width = self.width
        sendBuffer.resize(rows: assignments, columns: width)
        for position in 0..<assignments {
            let token = Int(routing.tokens[Int(plan.order[position])])
            sendBuffer.row(position).update(from: x + token * width, count: width)
        }
    }

    /// The experts of `group` over their blocks of `expertInput`.
    private func runExperts(_ group: Range<Int>) {
        var start = plan.rowsPerLocalExpert[..<group.lowerBound].reduce(0, +)
        for local in group {
            let count = plan.rowsPerLocalExpert[local]
            if count > 0 {
                experts[local].forward(expertInput.row(start), rows: count, into: expertOutput.row(start),
                                       hidden: hidden.hidden(fromRow: start))
            }
            start += count
        }
    }

    /// y_s = Σ_j w_j Y_back[j], in plan order (ascending expert per token).
    private func combineReturned(into y: UnsafeMutablePointer<T>, rows: Int) {
        let width = self.width
        y.update(repeating: 0, count: rows * width)
        for position in 0..<routing.count {
            let index = Int(plan.order[position])
            Kernels.axpy(routing.weights[index], returnedOutput.row(position), into: y + Int(routing.tokens[index]) * width, count: width)
        }
    }

    /// Adjoint of `forward`. dy: [N, C]; dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>) throws {
        if let shared { measure(\.experts) { shared.backward(x, dy, rows: rows, dx: dx) } }
        try backwardRouted(x, dy, rows: rows, dx: dx)
    }

    private func backwardRouted(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>) throws {
        if isDense, let dense {
            dHidden.resize(rows: rows, columns: dense.scratchColumns)
            measure(\.experts) {
                dense.backward(x, dy, rows: rows, dx: dx, hidden: hidden.hidden(),
                               scratch: dHidden.pointer)
            }
            return
        }
        measure(\.combine) { scaleGradients(dy) }
        try pipeline(forward: false)
        measure(\.dispatch) { scatterInputGradients(into: dx) }
        measure(\.route) {
            dWeights.withUnsafeMutableBufferPointer { dw in gate.backward(x, rows: rows, dWeights: dw.baseAddress!, dx: dx, routing: routing) }
        }
    }

    /// dY_back[j] = w_j dy_s (to the experts' ranks) and dw_j = <dy_s, Y_back[j]>.
    private func scaleGradients(_ dy: UnsafePointer<T>) {
        let width = self.width, assignments = routing.count
        dSend.resize(rows: assignments, columns: width)
        if dWeights.count < max(assignments, 1) { dWeights = Array(repeating: 0, count: max(assignments, 1)) }
        for position in 0..<assignments {
            let index = Int(plan.order[position])
            let dyRow = dy + Int(routing.tokens[index]) * width
            let weight = routing.weights[index], destination = dSend.row(position)
            for c in 0..<width { destination[c] = weight * dyRow[c] }
            dWeights[index] = Kernels.dot(dyRow, returnedOutput.row(position), count: width)
        }
    }

    /// The adjoint of the experts of `group`; their weight gradients are complete here (every
    /// source's rows are included).
    private func runExpertsBackward(_ group: Range<Int>) {
        var start = plan.rowsPerLocalExpert[..<group.lowerBound].reduce(0, +)
        for local in group {
            let count = plan.rowsPerLocalExpert[local]
            if count > 0 {
                experts[local].backward(expertInput.row(start), dExpertOutput.row(start), rows: count, dx: dExpertInput.row(start),
                                        hidden: hidden.hidden(fromRow: start),
                                        scratch: dHidden.row(start))
            }
            start += count
        }
    }

    /// dX rows, back on the tokens' rank in plan order, added into dx.
    private func scatterInputGradients(into dx: UnsafeMutablePointer<T>) {
        for position in 0..<routing.count {
            Kernels.add(dSend.row(position), into: dx + Int(routing.tokens[Int(plan.order[position])]) * width, count: width)
        }
    }

    /// Starts the all-to-all-v of the rows of `group`'s experts. Forward direction sends the
    /// plan's send rows; reverse swaps the sides.
    private func startExchange(_ source: Tensor<T>, into destination: Tensor<T>, reverse: Bool, group: Range<Int>,
                               in transfer: PendingTransfer) throws {
        let stride = MemoryLayout<T>.stride
        plan.splits(rowBytes: width * stride, reverse: reverse, group: group, perRank: placement.expertsPerRank)
        transfer.startedAt = Clock.nanoseconds()
        try communicator.startAllToAllV(
            send: UnsafeRawBufferPointer(start: source.pointer, count: source.count * stride),
            sendCounts: plan.sendBytes, sendOffsets: plan.sendByteOffsets,
            recv: UnsafeMutableRawBufferPointer(start: destination.pointer, count: destination.count * stride),
            recvCounts: plan.receiveBytes, recvOffsets: plan.receiveByteOffsets, in: transfer)
    }

    /// Waits for a transfer: the wait is exposed communication; start to completion, total.
    private func finishExchange(_ transfer: PendingTransfer) throws {
        let waited = Clock.nanoseconds()
        try communicator.finish(transfer)
        let now = Clock.nanoseconds()
        profile.exposedCommunication += Double(now - waited) * 1e-9
        profile.totalCommunication += Double(now - transfer.startedAt) * 1e-9
    }

    /// Moves blocks between (source, local expert) order and (local expert, source) order.
    private func permute(_ source: Tensor<T>, into destination: Tensor<T>, toExpertOrder: Bool, group: Range<Int>) {
        let width = self.width
        plan.forEachBlock(toExpertOrder: toExpertOrder, perRank: placement.expertsPerRank, group: group) { from, to, rows in
            destination.row(to).update(from: source.row(from), count: rows * width)
        }
    }
}
