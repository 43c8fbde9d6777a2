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
/// Backward runs the adjoint of each stage in reverse order.
public final class MoELayer<T: Scalar> {
    public let gate: Gate<T>
    /// This rank's experts, indexed by local expert.
    public let experts: [FeedForward<T, ExpertSharded>]
    public let placement: ExpertPlacement
    let communicator: Communicator
    public let routing = Routing<T>()
    var plan = DispatchPlan()
    /// Test hook: added to this rank's first send count after routing, to prove that a
    /// dispatch whose counts disagree with the routing is caught (not a hang or garbage).
    public var injectedCountError: Int64 = 0
    /// This layer's index in the model, for error messages.
    public var layerIndex = 0
    /// Time spent since the last `resetProfile()`, by stage.
    public private(set) var profile = StepProfile()
    /// Benchmarks: a barrier before each exchange, timed as `waiting` (see StepProfile).
    public var separateWaiting = false

    // Activations [A, C] / [A_recv, C|H].
    let sendBuffer = Tensor<T>(), receiveBuffer = Tensor<T>(), expertInput = Tensor<T>()
    let preActivation = Tensor<T>(), activation = Tensor<T>(), expertOutput = Tensor<T>()
    let returnedOutput = Tensor<T>()
    // Backward scratch.
    let dSend = Tensor<T>(), dReceive = Tensor<T>(), dExpertOutput = Tensor<T>(), dExpertInput = Tensor<T>()
    let dHidden = Tensor<T>()
    var dWeights: [T] = []

    /// EvoMoE's dense phase: a replicated dense FFN used instead of routing while `isDense`.
    public let dense: FeedForward<T, Replicated>?
    public internal(set) var isDense: Bool

    public init(gate: Gate<T>, experts: [FeedForward<T, ExpertSharded>], placement: ExpertPlacement,
                communicator: Communicator, dense: FeedForward<T, Replicated>? = nil) {
        precondition(experts.count == placement.expertsPerRank, "one FeedForward per local expert")
        precondition(gate.expertCount == placement.expertCount)
        self.dense = dense
        self.isDense = dense != nil
        self.gate = gate
        self.experts = experts
        self.placement = placement
        self.communicator = communicator
    }

    var width: Int { experts[0].width }
    var hiddenSize: Int { experts[0].hiddenSize }
    public func resetProfile() { profile = StepProfile() }

    /// Barrier time inside the running stage (with `separateWaiting`): booked as `waiting`.
    private var barrierSeconds = 0.0

    /// Times `body` into `stage`, less the barriers it waited in.
    private func measure<R>(_ stage: WritableKeyPath<StepProfile, Double>, _ body: () throws -> R) rethrows -> R {
        let started = Clock.nanoseconds()
        barrierSeconds = 0
        defer {
            profile[keyPath: stage] += Double(Clock.nanoseconds() - started) * 1e-9 - barrierSeconds
            profile.waiting += barrierSeconds
        }
        return try body()
    }

    /// x, y: [N, C]. y is overwritten.
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, context: RoutingContext) throws {
        if isDense, let dense {
            routing.resetDense(globalTokens: context.globalTokens)
            preActivation.resize(rows: rows, columns: hiddenSize)
            activation.resize(rows: rows, columns: hiddenSize)
            measure(\.experts) {
                dense.forward(x, rows: rows, into: y, preActivation: preActivation.pointer, activation: activation.pointer)
            }
            return
        }
        try measure(\.route) { try gate.forward(x, rows: rows, context: context, into: routing) }
        try measure(\.plan) {
            try plan.build(routing.experts, placement: placement, communicator: communicator, countError: injectedCountError)
            try plan.validate(keptPerExpert: routing.statistics.keptPerExpert, assignments: routing.count, placement: placement,
                              communicator: communicator, layer: layerIndex)
        }
        try measure(\.dispatch) { try dispatch(x) }
        measure(\.experts) { runExperts() }
        try measure(\.combine) { try combine(into: y, rows: rows) }
    }

    /// Gathers the rows to send in plan order, exchanges them, and regroups them by local expert.
    private func dispatch(_ x: UnsafePointer<T>) throws {
        let assignments = routing.count, width = self.width
        sendBuffer.resize(rows: assignments, columns: width)
        for position in 0..<assignments {
            let token = Int(routing.tokens[Int(plan.order[position])])
            sendBuffer.row(position).update(from: x + token * width, count: width)
        }
        receiveBuffer.resize(rows: plan.receivedRowCount, columns: width)
        try exchange(sendBuffer, into: receiveBuffer, reverse: false)
        expertInput.resize(rows: plan.receivedRowCount, columns: width)
        permute(receiveBuffer, into: expertInput, toExpertOrder: true)
    }

    private func runExperts() {
        let rows = plan.receivedRowCount
        preActivation.resize(rows: rows, columns: hiddenSize)
        activation.resize(rows: rows, columns: hiddenSize)
        expertOutput.resize(rows: rows, columns: width)
        var start = 0
        for (local, expert) in experts.enumerated() {
            let count = plan.rowsPerLocalExpert[local]
            if count > 0 {
                expert.forward(expertInput.row(start), rows: count, into: expertOutput.row(start),
                               preActivation: preActivation.row(start), activation: activation.row(start))
            }
            start += count
        }
    }

    /// Sends the expert outputs back and sums them per token with the routing weights.
    private func combine(into y: UnsafeMutablePointer<T>, rows: Int) throws {
        let width = self.width
        permute(expertOutput, into: receiveBuffer, toExpertOrder: false)
        returnedOutput.resize(rows: routing.count, columns: width)
        try exchange(receiveBuffer, into: returnedOutput, reverse: true)
        y.update(repeating: 0, count: rows * width)
        for position in 0..<routing.count {
            let index = Int(plan.order[position])
            Kernels.axpy(routing.weights[index], returnedOutput.row(position), into: y + Int(routing.tokens[index]) * width, count: width)
        }
    }

    /// Adjoint of `forward`. dy: [N, C]; dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>) throws {
        if isDense, let dense {
            dHidden.resize(rows: rows, columns: hiddenSize)
            measure(\.experts) {
                dense.backward(x, dy, rows: rows, dx: dx, preActivation: preActivation.pointer, activation: activation.pointer,
                               scratch: dHidden.pointer)
            }
            return
        }
        try measure(\.combine) { try combineBackward(dy) }
        measure(\.experts) { runExpertsBackward() }
        try measure(\.dispatch) { try dispatchBackward(into: dx) }
        measure(\.route) {
            dWeights.withUnsafeMutableBufferPointer { dw in gate.backward(x, rows: rows, dWeights: dw.baseAddress!, dx: dx, routing: routing) }
        }
    }

    /// dY_back[j] = w_j dy_s and dw_j = <dy_s, Y_back[j]>; dY_back goes to the experts' ranks
    /// and into expert order.
    private func combineBackward(_ dy: UnsafePointer<T>) throws {
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
        dReceive.resize(rows: plan.receivedRowCount, columns: width)
        try exchange(dSend, into: dReceive, reverse: false)
        dExpertOutput.resize(rows: plan.receivedRowCount, columns: width)
        permute(dReceive, into: dExpertOutput, toExpertOrder: true)
    }

    /// The experts' weight gradients are complete here: every source's rows are included.
    private func runExpertsBackward() {
        dExpertInput.resize(rows: plan.receivedRowCount, columns: width, zero: true)
        dHidden.resize(rows: plan.receivedRowCount, columns: hiddenSize)
        var start = 0
        for (local, expert) in experts.enumerated() {
            let count = plan.rowsPerLocalExpert[local]
            if count > 0 {
                expert.backward(expertInput.row(start), dExpertOutput.row(start), rows: count, dx: dExpertInput.row(start),
                                preActivation: preActivation.row(start), activation: activation.row(start), scratch: dHidden.row(start))
            }
            start += count
        }
    }

    /// dX_recv back to the tokens' ranks, then scatter-added into dx.
    private func dispatchBackward(into dx: UnsafeMutablePointer<T>) throws {
        permute(dExpertInput, into: dReceive, toExpertOrder: false)
        try exchange(dReceive, into: dSend, reverse: true)
        for position in 0..<routing.count {
            Kernels.add(dSend.row(position), into: dx + Int(routing.tokens[Int(plan.order[position])]) * width, count: width)
        }
    }

    /// All-to-all-v of whole rows. Forward direction sends the plan's send rows; reverse swaps.
    private func exchange(_ source: Tensor<T>, into destination: Tensor<T>, reverse: Bool) throws {
        if separateWaiting { try Clock.measure(&barrierSeconds) { try communicator.barrier() } }
        let stride = MemoryLayout<T>.stride
        plan.splits(rowBytes: width * stride, reverse: reverse)
        let started = Clock.nanoseconds()
        defer {
            let seconds = Double(Clock.nanoseconds() - started) * 1e-9
            profile.totalCommunication += seconds
            profile.exposedCommunication += seconds
        }
        try communicator.allToAllV(send: UnsafeRawBufferPointer(start: source.pointer, count: source.count * stride),
                                   sendCounts: plan.sendBytes, sendOffsets: plan.sendByteOffsets,
                                   recv: UnsafeMutableRawBufferPointer(start: destination.pointer, count: destination.count * stride),
                                   recvCounts: plan.receiveBytes, recvOffsets: plan.receiveByteOffsets)
    }

    /// Moves blocks between (source, local expert) order and (local expert, source) order.
    private func permute(_ source: Tensor<T>, into destination: Tensor<T>, toExpertOrder: Bool) {
        let width = self.width
        plan.forEachBlock(toExpertOrder: toExpertOrder, perRank: placement.expertsPerRank) { from, to, rows in
            destination.row(to).update(from: source.row(from), count: rows * width)
        }
    }
}
