import MoEComm

/// A mixture-of-experts feed-forward block with expert parallelism.
///
/// Forward, per ALGORITHMS.md 11 (megablocks' split: route, permute, exchange, compute):
///  1. gate: kept assignments (token s_j, expert e_j, weight w_j)
///  2. sort by (owner rank, local expert, token) and gather X_send [A, C]
///  3. exchange per-(rank, local expert) counts
///  4. all-to-all-v X_send -> X_recv, ordered (source, local expert, token)
///  5. permute to (local expert, source, token); each expert is one GEMM over its block
///  6. permute back; all-to-all-v with the splits swapped -> Y_back, aligned with X_send
///  7. combine: y_s = Σ_j w_j Y_back[j], in ascending expert order per token
/// Backward runs the adjoint of each step in reverse order.
public final class MoELayer<T: Scalar> {
    public let gate: any Gate<T>
    /// This rank's experts, indexed by local expert.
    public let experts: [FeedForward<T, ExpertSharded>]
    public let placement: ExpertPlacement
    let communicator: Communicator
    public let routing = Routing<T>()

    // Plan (reused every step).
    var order: [Int32] = []                // sorted position -> routing index
    var expertStart: [Int] = []            // global expert -> first sorted position
    var nextSlot: [Int] = []               // counting-sort cursor per expert
    var sendCounts: [Int64] = []           // [R, E_loc] rows to each (rank, local expert)
    var receiveCounts: [Int64] = []        // [R, E_loc] rows from each (source, local expert)
    var sendRows: [Int] = [], sendOffsets: [Int] = [], receiveRows: [Int] = [], receiveOffsets: [Int] = []
    var rowsPerLocalExpert: [Int] = []
    var receivedRowCount = 0
    /// Byte splits of one exchange, [R] each (stored arrays, updated in place).
    var sendBytes: [Int] = [], sendByteOffsets: [Int] = [], receiveBytes: [Int] = [], receiveByteOffsets: [Int] = []
    /// [E] rows received per global expert, summed over ranks for the consistency check.
    var receivedPerExpert: [Int64] = []
    /// Test hook: added to this rank's first send count after routing, to prove that a
    /// dispatch whose counts disagree with the routing is caught (not a hang or garbage).
    public var injectedCountError: Int64 = 0
    /// This layer's index in the model, for error messages.
    public var layerIndex = 0
    /// Time spent since the last `resetProfile()`: gate, dispatch, experts, and the whole layer.
    public private(set) var profile = StepProfile()

    public func resetProfile() { profile = StepProfile() }
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

    /// EvoMoE phase 1: a replicated dense FFN used instead of routing while `isDense`.
    public let dense: FeedForward<T, Replicated>?
    public var isDense: Bool

    public init(gate: any Gate<T>, experts: [FeedForward<T, ExpertSharded>], placement: ExpertPlacement,
                communicator: Communicator, dense: FeedForward<T, Replicated>? = nil) {
        self.dense = dense
        self.isDense = dense != nil
        precondition(experts.count == placement.expertsPerRank, "one FeedForward per local expert")
        precondition(gate.expertCount == placement.expertCount)
        self.gate = gate
        self.experts = experts
        self.placement = placement
        self.communicator = communicator
    }

    var width: Int { experts[0].width }
    var hiddenSize: Int { experts[0].hiddenSize }

    /// x, y: [N, C]. y is overwritten.
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, context: RoutingContext) throws {
        let started = Clock.nanoseconds()
        defer { profile.total += Double(Clock.nanoseconds() - started) * 1e-9 }
        let width = self.width
        if isDense, let dense {
            routing.reset(expertCount: placement.expertCount)
            preActivation.resize(rows: rows, columns: hiddenSize)
            activation.resize(rows: rows, columns: hiddenSize)
            Clock.measure(&profile.experts) {
                dense.forward(x, rows: rows, into: y, preActivation: preActivation.pointer, activation: activation.pointer)
            }
            return
        }
        try Clock.measure(&profile.gate) { try gate.forward(x, rows: rows, context: context, into: routing) }
        try Clock.measure(&profile.dispatch) { try buildPlan() }
        // 2. gather the rows to send, in sorted order
        let assignments = routing.count
        sendBuffer.resize(rows: assignments, columns: width)
        for position in 0..<assignments {
            let token = Int(routing.tokens[Int(order[position])])
            (sendBuffer.pointer + position * width).update(from: x + token * width, count: width)
        }
        // 4. dispatch
        receiveBuffer.resize(rows: receivedRowCount, columns: width)
        try exchange(sendBuffer, into: receiveBuffer, reverse: false)
        // 5. regroup by local expert and run each expert on its block
        expertInput.resize(rows: receivedRowCount, columns: width)
        permute(receiveBuffer, into: expertInput, toExpertOrder: true)
        preActivation.resize(rows: receivedRowCount, columns: hiddenSize)
        activation.resize(rows: receivedRowCount, columns: hiddenSize)
        expertOutput.resize(rows: receivedRowCount, columns: width)
        var start = 0
        let expertsStarted = Clock.nanoseconds()
        for (local, expert) in experts.enumerated() {
            let count = rowsPerLocalExpert[local]
            if count > 0 {
                expert.forward(expertInput.row(start), rows: count, into: expertOutput.row(start),
                               preActivation: preActivation.row(start), activation: activation.row(start))
            }
            start += count
        }
        profile.experts += Double(Clock.nanoseconds() - expertsStarted) * 1e-9
        // 6. back to the senders
        permute(expertOutput, into: receiveBuffer, toExpertOrder: false)
        returnedOutput.resize(rows: assignments, columns: width)
        try exchange(receiveBuffer, into: returnedOutput, reverse: true)
        // 7. combine
        y.update(repeating: 0, count: rows * width)
        for position in 0..<assignments {
            let index = Int(order[position])
            Kernels.axpy(routing.weights[index], returnedOutput.row(position),
                         into: y + Int(routing.tokens[index]) * width, count: width)
        }
    }

    /// Adjoint of `forward`. dy: [N, C]; dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>) throws {
        let started = Clock.nanoseconds()
        defer { profile.total += Double(Clock.nanoseconds() - started) * 1e-9 }
        if isDense, let dense {
            dHidden.resize(rows: rows, columns: hiddenSize)
            Clock.measure(&profile.experts) {
                dense.backward(x, dy, rows: rows, dx: dx, preActivation: preActivation.pointer, activation: activation.pointer,
                               scratch: dHidden.pointer)
            }
            return
        }
        let width = self.width, assignments = routing.count
        // 7'. dY_back[j] = w_j dy_s;  dw_j = <dy_s, Y_back[j]>
        dSend.resize(rows: assignments, columns: width)
        if dWeights.count < assignments { dWeights = Array(repeating: 0, count: assignments) }
        for position in 0..<assignments {
            let index = Int(order[position])
            let dyRow = dy + Int(routing.tokens[index]) * width
            let weight = routing.weights[index]
            let destination = dSend.row(position)
            for c in 0..<width { destination[c] = weight * dyRow[c] }
            dWeights[index] = Kernels.dot(dyRow, returnedOutput.row(position), count: width)
        }
        // 6'. to the experts' ranks, then into expert order
        dReceive.resize(rows: receivedRowCount, columns: width)
        try exchange(dSend, into: dReceive, reverse: false)
        dExpertOutput.resize(rows: receivedRowCount, columns: width)
        permute(dReceive, into: dExpertOutput, toExpertOrder: true)
        // 5'. expert backward: weight gradients complete here, every source's rows included
        dExpertInput.resize(rows: receivedRowCount, columns: width, zero: true)
        dHidden.resize(rows: receivedRowCount, columns: hiddenSize)
        let expertsStarted = Clock.nanoseconds()
        var start = 0
        for (local, expert) in experts.enumerated() {
            let count = rowsPerLocalExpert[local]
            if count > 0 {
                expert.backward(expertInput.row(start), dExpertOutput.row(start), rows: count, dx: dExpertInput.row(start),
                                preActivation: preActivation.row(start), activation: activation.row(start),
                                scratch: dHidden.row(start))
            }
            start += count
        }
        profile.experts += Double(Clock.nanoseconds() - expertsStarted) * 1e-9
        // 4'. back to the tokens' ranks
        permute(dExpertInput, into: dReceive, toExpertOrder: false)
        try exchange(dReceive, into: dSend, reverse: true)
        // 2'. scatter-add into dx, then the router's own gradient
        for position in 0..<assignments {
            Kernels.add(dSend.row(position), into: dx + Int(routing.tokens[Int(order[position])]) * width, count: width)
        }
        Clock.measure(&profile.gate) {
            dWeights.withUnsafeBufferPointer { dw in
                gate.backward(x, rows: rows, dWeights: dw.baseAddress!, dx: dx, routing: routing)
            }
        }
    }

    /// Counting sort of the kept assignments by expert (stable, so token order within an
    /// expert), then the count exchange that tells every rank what it will receive.
    private func buildPlan() throws {
        let experts = placement.expertCount, ranks = placement.rankCount, perRank = placement.expertsPerRank
        let assignments = routing.count
        if expertStart.count != experts + 1 { expertStart = Array(repeating: 0, count: experts + 1) }
        for e in 0...experts { expertStart[e] = 0 }
        for j in 0..<assignments { expertStart[Int(routing.experts[j]) + 1] += 1 }
        for e in 0..<experts { expertStart[e + 1] += expertStart[e] }
        if order.count < assignments { order = Array(repeating: 0, count: assignments) }
        if nextSlot.count != experts + 1 { nextSlot = expertStart }
        for e in 0...experts { nextSlot[e] = expertStart[e] }
        for j in 0..<assignments {
            let e = Int(routing.experts[j])
            order[nextSlot[e]] = Int32(j)
            nextSlot[e] += 1
        }
        // Rows for every (destination rank, local expert); zero outside this rank's group.
        if sendCounts.count != ranks * perRank {
            sendCounts = Array(repeating: 0, count: ranks * perRank)
            receiveCounts = sendCounts
            sendRows = Array(repeating: 0, count: ranks)
            sendOffsets = sendRows; receiveRows = sendRows; receiveOffsets = sendRows
            rowsPerLocalExpert = Array(repeating: 0, count: perRank)
        }
        for index in sendCounts.indices { sendCounts[index] = 0 }
        for e in 0..<experts {
            sendCounts[placement.owner(of: e) * perRank + placement.localIndex(of: e)] = Int64(expertStart[e + 1] - expertStart[e])
        }
        sendCounts[placement.groupBase * perRank] += injectedCountError
        try sendCounts.withUnsafeBufferPointer { send in
            try receiveCounts.withUnsafeMutableBufferPointer { receive in
                try communicator.allToAll(send: send, recv: receive, blockCount: perRank)
            }
        }
        var sendTotal = 0, receiveTotal = 0
        for rank in 0..<ranks {
            sendOffsets[rank] = sendTotal
            receiveOffsets[rank] = receiveTotal
            sendRows[rank] = 0
            receiveRows[rank] = 0
            for local in 0..<perRank {
                sendRows[rank] += Int(sendCounts[rank * perRank + local])
                let received = receiveCounts[rank * perRank + local]
                guard received >= 0, received <= Int64(Int32.max) else {
                    throw CommError.mismatch(operation: "MoE count exchange", rank: communicator.rank,
                                             detail: "rank \(rank) announced \(received) rows")
                }
                receiveRows[rank] += Int(received)
            }
            sendTotal += sendRows[rank]
            receiveTotal += receiveRows[rank]
        }
        for local in 0..<perRank {
            rowsPerLocalExpert[local] = (0..<ranks).reduce(0) { $0 + Int(receiveCounts[$1 * perRank + local]) }
        }
        receivedRowCount = receiveTotal
        try checkCounts(sendTotal: sendTotal)
    }

    /// The exchanged counts must add up to what the gate kept: summed over ranks, the rows each
    /// expert receives equal its global kept count (which the gate computed by its own
    /// all-reduce). Every rank sees the same sums, so every rank throws together: no rank is
    /// left waiting in the all-to-all that would follow.
    private func checkCounts(sendTotal: Int) throws {
        let experts = placement.expertCount
        if receivedPerExpert.count != experts + 1 { receivedPerExpert = Array(repeating: 0, count: experts + 1) }
        for e in 0...experts { receivedPerExpert[e] = 0 }
        for local in 0..<placement.expertsPerRank {
            receivedPerExpert[placement.localExperts.lowerBound + local] = Int64(rowsPerLocalExpert[local])
        }
        // Last slot: ranks whose send total disagrees with their own routing.
        receivedPerExpert[experts] = sendTotal == routing.count ? 0 : 1
        try communicator.allReduce(&receivedPerExpert)
        for e in 0..<experts where receivedPerExpert[e] != routing.keptPerExpert[e] || receivedPerExpert[experts] != 0 {
            throw CommError.mismatch(
                operation: "MoE dispatch (layer \(layerIndex))", rank: communicator.rank,
                detail: "expert \(e) is announced \(receivedPerExpert[e]) rows but the gate kept \(routing.keptPerExpert[e]) "
                    + "(\(receivedPerExpert[experts]) rank(s) send counts that disagree with their routing)")
        }
    }

    /// All-to-all-v of whole rows. Forward direction sends `sendRows`; reverse swaps the splits.
    private func exchange(_ source: Tensor<T>, into destination: Tensor<T>, reverse: Bool) throws {
        if separateWaiting { try Clock.measure(&profile.waiting) { try communicator.barrier() } }
        let started = Clock.nanoseconds()
        defer { profile.dispatch += Double(Clock.nanoseconds() - started) * 1e-9 }
        // Byte splits of the plan, filled in place (no allocation per exchange).
        let rowBytes = width * MemoryLayout<T>.stride
        let ranks = placement.rankCount
        if sendBytes.count != ranks {
            sendBytes = Array(repeating: 0, count: ranks)
            sendByteOffsets = sendBytes; receiveBytes = sendBytes; receiveByteOffsets = sendBytes
        }
        for rank in 0..<ranks {
            sendBytes[rank] = (reverse ? receiveRows[rank] : sendRows[rank]) * rowBytes
            sendByteOffsets[rank] = (reverse ? receiveOffsets[rank] : sendOffsets[rank]) * rowBytes
            receiveBytes[rank] = (reverse ? sendRows[rank] : receiveRows[rank]) * rowBytes
            receiveByteOffsets[rank] = (reverse ? sendOffsets[rank] : receiveOffsets[rank]) * rowBytes
        }
        try communicator.allToAllV(send: UnsafeRawBufferPointer(start: source.pointer, count: source.count * MemoryLayout<T>.stride),
                                   sendCounts: sendBytes, sendOffsets: sendByteOffsets,
                                   recv: UnsafeMutableRawBufferPointer(start: destination.pointer, count: destination.count * MemoryLayout<T>.stride),
                                   recvCounts: receiveBytes, recvOffsets: receiveByteOffsets)
    }

    /// Moves blocks between (source, local expert) order and (local expert, source) order.
    private func permute(_ source: Tensor<T>, into destination: Tensor<T>, toExpertOrder: Bool) {
        let ranks = placement.rankCount, perRank = placement.expertsPerRank, width = self.width
        var expertOrderOffset = 0
        for local in 0..<perRank {
            for rank in 0..<ranks {
                var sourceOrderOffset = receiveOffsets[rank]
                for previous in 0..<local { sourceOrderOffset += Int(receiveCounts[rank * perRank + previous]) }
                let count = Int(receiveCounts[rank * perRank + local])
                if count > 0 {
                    let from = toExpertOrder ? sourceOrderOffset : expertOrderOffset
                    let to = toExpertOrder ? expertOrderOffset : sourceOrderOffset
                    destination.row(to).update(from: source.row(from), count: count * width)
                }
                expertOrderOffset += count
            }
        }
    }
}
