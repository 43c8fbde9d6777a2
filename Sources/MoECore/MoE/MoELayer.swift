import MoEComm

/// A mixture-of-experts feed-forward block with expert parallelism (docs/ARCHITECTURE.md).
///
/// Forward, in five stages (megablocks' split; the step profile uses the same names):
///  1. route:    the gate's kept assignments (token s_j, expert e_j, weight w_j)
///  2. plan:     sort them by (owner rank, local expert, token), one unit per (token, rank);
///               exchange and check the counts; send each rank its records (unit, weight)
///  3. dispatch: gather each unit's token row X_send [U, C]; all-to-all-v to the experts' ranks;
///               fan the rows out to their experts (expert order)
///  4. experts:  each local expert is one FFN over its block of rows
///  5. combine:  per unit, r_u = Σ w_j Y[j] over its experts on that rank (ascending expert);
///               all-to-all-v back; y_s = Σ over ranks of the returned r_u (ascending rank)
/// A token crosses the network once per rank it visits, not once per expert (`DispatchPlan`).
/// Backward runs the adjoint of each stage in reverse order: dy once per unit out, the experts'
/// dx summed per unit back, and the weight gradients dw_j = <dy_s, Y[j]> back with the records.
/// Stages 3-5 run as a pipeline over groups of local experts (`train.dispatch_chunks`): one
/// group's rows travel while the previous group's experts compute, with the same arithmetic as
/// one exchange.
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
    private var groupOfLocal: [Int] = []
    private var inbound: [PendingTransfer] = [], outbound: [PendingTransfer] = []
    /// Backward: the routing weights' gradients on their way back to the tokens' ranks.
    private let weightGradientTransfer = PendingTransfer()
    /// The backlog of a backward called without the model's (`backward`), and the one the
    /// running backward fills (nil outside backward).
    private let ownBacklog = ExpertGradientBacklog<T>()
    private var backlog: ExpertGradientBacklog<T>?
    /// Seconds already counted in some part of the profile (for `measure`: a stage leaves out
    /// what was counted inside its span, such as the backlog's products run in a wait, counted as
    /// `experts`, and the wait left after them, counted as `waiting`).
    private var countedSeconds = 0.0
    /// Per local expert and projection (`staleIndex`): whether its weight gradient still holds
    /// the last step's values, which its first product of this step overwrites instead of
    /// adding to (`expectOverwrittenWeightGradients`).
    private var staleWeightGradients: [Bool]
    /// Per (local expert, projection), in `staleIndex` order: Σ g² over the weight's and its
    /// bias's gradients, taken right after the product that last wrote the weight's (its
    /// [C, H] block still in cache; `fresh`), or by `settleWeightGradients` for the others.
    /// Spares the gradient norm a pass over every expert gradient in memory (`gradientSquares`).
    private var squares: [Double], freshSquares: [Bool]
    /// How many gradients `squares` covers: the local experts' weights and biases.
    private let squaredCount: Int
    /// Whether `squares` holds the gradients as they are now (from `settleWeightGradients` until
    /// the gradients next change).
    private var squaresSettled = false

    // Unit rows, both passes (x forward, dy backward): sent [U, C], received [U_recv, C], the
    // experts' sums per received unit [U_recv, C] and those sums back [U, C].
    let unitRows = Tensor<T>(), receivedUnits = Tensor<T>(), unitResults = Tensor<T>(), returnedResults = Tensor<T>()
    // Expert rows [A_recv, C|H]; expertOutput stays for the weight gradients.
    let expertInput = Tensor<T>(), hidden = FeedForwardStorage<T>(), expertOutput = Tensor<T>()
    /// expertInput's bf16 copy in bf16 mode, written by the fan-out (the experts' up projections
    /// read it forward and for their weight gradients).
    let roundedExpertInput = BFloat16Buffer()
    let dExpertOutput = Tensor<T>(), dExpertInput = Tensor<T>(), dHidden = Tensor<T>()
    /// Records out [A] (plan order) and in [A_recv]; weight gradients by record [A_recv], back in
    /// plan order [A], and by routing index [A].
    var recordsOut: [RoutedRow<T>] = [], recordsIn: [RoutedRow<T>] = []
    let dWeightsByRecord = Tensor<T>(), dWeightsReturned = Tensor<T>()
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
        staleWeightGradients = Array(repeating: false, count: 2 * experts.count)
        squares = Array(repeating: 0, count: 2 * experts.count)
        freshSquares = Array(repeating: false, count: 2 * experts.count)
        squaredCount = experts.reduce(0) { total, expert in
            total + expert.up.weight.count + (expert.up.bias?.count ?? 0) + expert.down.weight.count + (expert.down.bias?.count ?? 0)
        }
        makeGroups()
    }

    var width: Int { experts[0].width }
    /// Whether the experts' products run in bf16 (their hidden layers keep a bf16 copy).
    var roundsProducts: Bool { experts[0].up.weight.store.matmul?.precision == .bf16 }
    public func resetProfile() { profile = StepProfile() }

    /// Times `body` into `stage`, less the time counted inside it (a nested `measure`, a wait).
    private func measure<R>(_ stage: WritableKeyPath<StepProfile, Double>, _ body: () throws -> R) rethrows -> R {
        let started = Clock.nanoseconds(), countedBefore = countedSeconds
        defer {
            let span = Double(Clock.nanoseconds() - started) * 1e-9
            profile[keyPath: stage] += span - (countedSeconds - countedBefore)
            countedSeconds = countedBefore + span
        }
        return try body()
    }

    /// The hooks' wait for the slowest rank before an exchange, counted as `waiting`.
    private func waitForSlowestRank() throws {
        if let hooks { profile.waitingInForward += try hooks.waitForSlowestRank(communicator) }
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
        try waitForSlowestRank()   // the statistics' all-reduce in the gate is the layer's first collective
        try measure(\.route) { try gate.forward(x, rows: rows, context: context, into: routing) }
        try measure(\.plan) {
            try plan.build(tokens: routing.tokens, experts: routing.experts, tokenCount: rows, placement: placement,
                           groupOfLocal: groupOfLocal, communicator: communicator, countError: hooks?.dispatchCountError ?? 0)
            try plan.validate(keptPerExpert: routing.statistics.keptPerExpert, assignments: routing.count, placement: placement,
                              communicator: communicator, layer: layerIndex)
            try exchangeRecords()
        }
        profile.expertBytesSent += Double(plan.bytesSentToOtherRanks(
            rank: communicator.rank, rowBytes: width * MemoryLayout<T>.stride,
            recordBytes: MemoryLayout<RoutedRow<T>>.stride, scalarBytes: MemoryLayout<T>.stride))
        measure(\.dispatch) { gatherUnitRows(x) }
        try pipeline(forward: true, source: x)
        measure(\.combine) { sumReturnedResults(into: y, rows: rows, accumulating: false) }
    }

    /// Sends every expert's rank the records of its assignments (plan order) and maps them.
    private func exchangeRecords() throws {
        let assignments = routing.count, stride = MemoryLayout<RoutedRow<T>>.stride
        // At least one element each: an empty array may have no address to hand MPI.
        growBuffer(&recordsOut, toHold: max(assignments, 1), filling: RoutedRow(unit: 0, weight: 0))
        growBuffer(&recordsIn, toHold: max(plan.receivedRowCount, 1), filling: RoutedRow(unit: 0, weight: 0))
        for position in 0..<assignments {
            recordsOut[position] = RoutedRow(unit: plan.assignmentUnit[position], weight: routing.weights[Int(plan.order[position])])
        }
        plan.recordSplits(recordBytes: stride, reverse: false)
        try recordsOut.withUnsafeBytes { send in
            try recordsIn.withUnsafeMutableBytes { receive in
                try communicator.allToAllV(send: send, sendCounts: plan.sendBytes, sendOffsets: plan.sendByteOffsets,
                                           recv: receive, recvCounts: plan.receiveBytes, recvOffsets: plan.receiveByteOffsets)
            }
        }
        try recordsIn.withUnsafeBufferPointer { try plan.mapReceived($0, perRank: placement.expertsPerRank, rank: communicator.rank) }
    }

    private func makeGroups() {
        let perRank = placement.expertsPerRank, count = max(1, min(dispatchChunks, perRank))
        groups = (0..<count).map { (($0 * perRank) / count)..<((($0 + 1) * perRank) / count) }
        groupOfLocal = groups.enumerated().flatMap { index, group in group.map { _ in index } }
        inbound = groups.map { _ in PendingTransfer() }
        outbound = groups.map { _ in PendingTransfer() }
    }

    /// Stages 3-5 (or their adjoints) as a pipeline over groups of local experts: the units of
    /// group g+1 travel while group g's experts compute, and each group's results start back as
    /// soon as they are done. Every expert still runs once over all its rows and each unit's sum
    /// runs in ascending expert order, so the arithmetic is that of one exchange, bit for bit.
    ///   forward:  unitRows -> receivedUnits -> expertInput -> experts -> expertOutput
    ///             -> unitResults (weighted sums) -> returnedResults
    ///   backward: unitRows (dy) -> receivedUnits -> dExpertOutput (scaled) -> experts' adjoint
    ///             -> dExpertInput -> unitResults (sums) -> returnedResults
    /// This rank's own units skip the exchanges: read from `source` (x or dy) and back from
    /// unitResults (`receivedUnitRow`, `returnedRow`).
    private func pipeline(forward: Bool, source: UnsafePointer<T>) throws {
        let received = plan.receivedRowCount, width = self.width
        receivedUnits.resize(rows: plan.receivedUnitCount, columns: width)
        unitResults.resize(rows: plan.receivedUnitCount, columns: width)   // `sumPerUnit` writes every row
        returnedResults.resize(rows: plan.sentUnitCount, columns: width)
        if forward {
            expertInput.resize(rows: received, columns: width)
            if roundsProducts { roundedExpertInput.reserve(received * width) }
            hidden.resize(rows: received, for: experts[0], rounded: roundsProducts)
            expertOutput.resize(rows: received, columns: width)
        } else {
            dExpertOutput.resize(rows: received, columns: width)
            dExpertInput.resize(rows: received, columns: width)   // each expert writes its rows
            dHidden.resize(rows: received, columns: experts[0].scratchColumns)
            dWeightsByRecord.resize(rows: max(received, 1), columns: 1)
        }
        // Backward: each wait for a slower peer first runs deferred weight gradients (`backlog`),
        // so the benchmark's barriers, which would make a rank wait idle, are left out.
        let backlog = forward ? nil : self.backlog
        if forward { try waitForSlowestRank() }
        try startExchange(reverse: false, group: 0, in: inbound[0])
        for (index, group) in groups.enumerated() {
            if index + 1 < groups.count { try startExchange(reverse: false, group: index + 1, in: inbound[index + 1]) }
            let rows = plan.expertRows(of: group)
            try measure(\.dispatch) {
                try finishExchange(inbound[index], filling: backlog)
                if forward { fanOut(group, source: source) } else { fanOutGradients(rows, source: source) }
                // The routing weights' gradients are complete with the last group's fan-out:
                // they travel while the experts run.
                if !forward && index == groups.count - 1 { try startWeightGradientReturn() }
            }
            measure(\.experts) { forward ? runExperts(group) : runExpertsBackwardInput(group) }
            // One group (no pipeline): the benchmark's barrier keeps the slower rank's expert
            // time out of the return exchange, as before the forward one.
            if groups.count == 1 && forward { try waitForSlowestRank() }
            try measure(\.combine) {
                sumPerUnit(forward ? expertOutput : dExpertInput, rows: rows, weighted: forward)
                try startExchange(reverse: true, group: index, in: outbound[index])
                // Lets every transfer in flight move on (those not started this pass are complete).
                try communicator.progress(inbound)
                try communicator.progress(outbound)
                try communicator.progress(weightGradientTransfer)
            }
        }
        try measure(\.combine) { for transfer in outbound { try finishExchange(transfer, filling: backlog) } }
    }

    /// Each unit's row in send order: the token's row of x (forward) or of dy (backward); this
    /// rank's own units stay where they are.
    private func gatherUnitRows(_ source: UnsafePointer<T>) {
        let width = self.width
        unitRows.resize(rows: plan.sentUnitCount, columns: width)
        for row in 0..<plan.sentUnitCount where !plan.ownSentRows.contains(row) {
            unitRows.row(row).update(from: source + Int(plan.unitToken[row]) * width, count: width)
        }
    }

    /// Received unit `unit`'s row: from the exchange, or for one of this rank's own units, the
    /// token's row of the pass's `source`.
    private func receivedUnitRow(_ unit: Int, source: UnsafePointer<T>) -> UnsafePointer<T> {
        guard plan.ownReceivedUnits.contains(unit) else { return UnsafePointer(receivedUnits.row(unit)) }
        let sendRow = plan.ownSentRows.lowerBound + unit - plan.ownReceivedUnits.lowerBound
        return source + Int(plan.unitToken[sendRow]) * width
    }

    /// Returned row `slot`: from the exchange, or for one of this rank's own units, its sum where
    /// the experts left it.
    private func returnedRow(_ slot: Int) -> UnsafePointer<T> {
        guard plan.ownSentRows.contains(slot) else { return UnsafePointer(returnedResults.row(slot)) }
        return UnsafePointer(unitResults.row(plan.ownReceivedUnits.lowerBound + slot - plan.ownSentRows.lowerBound))
    }

    /// The expert rows of `group` from their received units: in bf16 mode their bf16 copy,
    /// rounded from the unit's row, and the fp32 rows only where an expert's products read them.
    private func fanOut(_ group: Range<Int>, source: UnsafePointer<T>) {
        let rounded = roundsProducts ? roundedExpertInput.pointer : nil
        forEachExpertBlock(in: group) { local, start, count in
            // In bf16 mode the products read only the copy, but for an expert given one row.
            let keepsFloat = rounded == nil || experts[local].readsFloatOperands(rows: count)
            for row in start..<(start + count) {
                let unitRow = receivedUnitRow(Int(plan.expertRowUnit[row]), source: source)
                if keepsFloat { expertInput.row(row).update(from: unitRow, count: width) }
                if let rounded { BFloat16.round(asFloat(unitRow), into: rounded + row * width, count: width) }
            }
        }
    }

    /// The experts' hidden-layer view from expert row `start` on, with the input's bf16 copy.
    private func expertHidden(fromRow start: Int) -> FeedForwardHidden<T> {
        var view = hidden.hidden(fromRow: start)
        if roundsProducts { view.roundedInput = UnsafePointer(roundedExpertInput.pointer + start * width) }
        return view
    }

    /// Backward of the weighted sum, on the expert's rank: dY[j] = w_j dy_s, and
    /// dw_j = <dy_s, Y[j]> by record (they go back with the records' splits).
    private func fanOutGradients(_ rows: Range<Int>, source: UnsafePointer<T>) {
        let width = self.width
        for row in rows {
            let record = Int(plan.expertRowRecord[row]), dyRow = receivedUnitRow(Int(plan.expertRowUnit[row]), source: source)
            Kernels.scale(recordsIn[record].weight, dyRow, into: dExpertOutput.row(row), count: width)
            dWeightsByRecord.pointer[record] = Kernels.dot(dyRow, expertOutput.row(row), count: width)
        }
    }

    /// unitResults[u] += (w_j) rows[j] for the expert rows `rows`, in expert order (so each
    /// unit sums its experts in ascending order); a unit's first row is written, not added, so
    /// the rows need no zeroing pass.
    private func sumPerUnit(_ source: Tensor<T>, rows: Range<Int>, weighted: Bool) {
        let width = self.width
        for row in rows {
            let destination = unitResults.row(Int(plan.resultSlot[Int(plan.expertRowUnit[row])]))
            let first = plan.expertRowStartsUnit[row], values = source.row(row)
            let weight = recordsIn[Int(plan.expertRowRecord[row])].weight
            switch (weighted, first) {
            case (true, true): Kernels.scale(weight, values, into: destination, count: width)
            case (true, false): Kernels.axpy(weight, values, into: destination, count: width)
            case (false, true): destination.update(from: values, count: width)
            case (false, false): Kernels.add(values, into: destination, count: width)
            }
        }
    }

    /// The experts of `group` over their blocks of `expertInput`.
    private func runExperts(_ group: Range<Int>) {
        forEachExpertBlock(in: group) { local, start, count in
            experts[local].forward(expertInput.row(start), rows: count, into: expertOutput.row(start),
                                   hidden: expertHidden(fromRow: start))
        }
    }

    /// y_s (+)= Σ over ranks (ascending) of the returned sums of s's units; not accumulating,
    /// the first returned sum is written (a token with none gets zeros), the rest added.
    private func sumReturnedResults(into y: UnsafeMutablePointer<T>, rows: Int, accumulating: Bool) {
        let width = self.width, ranks = placement.rankCount
        for s in 0..<rows {
            let row = y + s * width
            var written = accumulating
            for peer in 0..<ranks {
                let slot = Int(plan.returnSlot[s * ranks + peer])
                guard slot >= 0 else { continue }
                if written { Kernels.add(returnedRow(slot), into: row, count: width) } else { row.update(from: returnedRow(slot), count: width) }
                written = true
            }
            if !written { row.update(repeating: 0, count: width) }
        }
    }

    /// Adjoint of `forward`. dy: [N, C]; dx is accumulated. The local experts' weight gradients
    /// go to `backlog` (the model's, shared by its MoE layers, which runs them in the waits of
    /// later exchanges and the rest after its backward); without one they are complete on return.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>,
                         backlog: ExpertGradientBacklog<T>? = nil) throws {
        self.backlog = backlog ?? ownBacklog
        defer { self.backlog = nil }
        if let shared { measure(\.experts) { shared.backward(x, dy, rows: rows, dx: dx) } }
        try backwardRouted(x, dy, rows: rows, dx: dx)
        if backlog == nil { ownBacklog.runAll() }
    }

    /// One weight product of local expert `local`'s adjoint over its rows of the last backward
    /// (complete: every source's rows are included). The backlog calls it.
    func runWeightGradient(ofExpert local: Int, projection: FeedForward<T, ExpertSharded>.Projection) {
        let start = plan.rowsPerLocalExpert[..<local].reduce(0, +), count = plan.rowsPerLocalExpert[local]
        let flag = staleIndex(local, projection), stale = staleWeightGradients[flag]
        staleWeightGradients[flag] = false
        measure(\.experts) {
            experts[local].backwardWeights(of: projection, expertInput.row(start), dExpertOutput.row(start), rows: count,
                                           hidden: expertHidden(fromRow: start), scratch: dHidden.row(start), accumulate: !stale)
        }
        // Its bias's gradient is complete too: the input half of the adjoint summed it before.
        squares[flag] = gradientSquares(ofProjectionAt: flag)
        freshSquares[flag] = true
        squaresSettled = false
    }

    /// Σ g² over the gradients of the weight at `index` of `staleWeightGradients` and its bias.
    private func gradientSquares(ofProjectionAt index: Int) -> Double {
        let linear = staleProjection(index)
        let weightSquares = Kernels.sumOfSquares(linear.weight.gradient, count: linear.weight.count)
        return weightSquares + (linear.bias.map { Kernels.sumOfSquares($0.gradient, count: $0.count) } ?? 0)
    }

    /// After `settleWeightGradients`, until the gradients change: Σ g² over this layer's local
    /// experts' gradients (nil otherwise), summed in a fixed order, and how many gradients that
    /// covers.
    public var gradientSquares: (sum: Double, count: Int)? {
        guard squaresSettled else { return nil }
        return (squares.reduce(0, +), squaredCount)
    }

    /// The gradients were changed other than by this layer's products (zeroed, reduced).
    public func gradientsChanged() { squaresSettled = false }

    /// The position of (local expert, projection) in `staleWeightGradients`: each expert's down
    /// projection, then its up projection (`staleWeight` is the inverse).
    private func staleIndex(_ local: Int, _ projection: FeedForward<T, ExpertSharded>.Projection) -> Int {
        2 * local + (projection == .down ? 0 : 1)
    }

    /// The (local expert, projection) at `index` of `staleWeightGradients`.
    private func staleProjection(_ index: Int) -> Linear<T, ExpertSharded> {
        experts[index / 2].linear(of: index % 2 == 0 ? .down : .up)
    }

    /// The weight of the (local expert, projection) at `index` of `staleWeightGradients`.
    private func staleWeight(_ index: Int) -> Parameter<T, ExpertSharded> { staleProjection(index).weight }

    /// The expert store's entries of the local experts' weights (the gradients this layer
    /// overwrites once `expectOverwrittenWeightGradients` says they are stale).
    public var weightGradientEntries: [Int] {
        staleWeightGradients.indices.map { staleWeight($0).store.entryIndex(of: staleWeight($0)) }
    }

    /// After an update that read the experts' weight gradients without zeroing them (AdamW's
    /// `gradientsOverwritten`): this step's first product of each overwrites it, which spares
    /// the optimizer a store and the product a read of [C, H] per projection and expert.
    public func expectOverwrittenWeightGradients() {
        for index in staleWeightGradients.indices { staleWeightGradients[index] = true }
        squaresSettled = false
    }

    /// After the step's backward passes: the weight gradients of experts that got no rows in
    /// any of them still hold the last step's values; they become zeros. Then every projection
    /// has its gradients' squares (`gradientSquares`): the ones no product wrote are summed here.
    public func settleWeightGradients() {
        for (index, stale) in staleWeightGradients.enumerated() {
            if stale {
                let weight = staleWeight(index)
                weight.gradient.update(repeating: 0, count: weight.count)
                staleWeightGradients[index] = false
            }
            if !freshSquares[index] { squares[index] = gradientSquares(ofProjectionAt: index) }
            freshSquares[index] = false
        }
        squaresSettled = true
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
        measure(\.combine) { gatherUnitRows(dy) }
        try pipeline(forward: false, source: dy)
        try measure(\.combine) { try returnWeightGradients() }
        measure(\.dispatch) { sumReturnedResults(into: dx, rows: rows, accumulating: true) }
        measure(\.route) {
            dWeights.withUnsafeMutableBufferPointer { dw in gate.backward(x, rows: rows, dWeights: dw.baseAddress!, dx: dx, routing: routing) }
        }
    }

    /// Starts sending the weight gradients computed on the experts' ranks (by record) back to the
    /// tokens' ranks, in plan order.
    private func startWeightGradientReturn() throws {
        let stride = MemoryLayout<T>.stride
        dWeightsReturned.resize(rows: max(routing.count, 1), columns: 1)
        plan.recordSplits(recordBytes: stride, reverse: true)
        weightGradientTransfer.startedAt = Clock.nanoseconds()
        try communicator.startAllToAllV(
            send: UnsafeRawBufferPointer(start: dWeightsByRecord.pointer, count: dWeightsByRecord.count * stride),
            sendCounts: plan.sendBytes, sendOffsets: plan.sendByteOffsets,
            recv: UnsafeMutableRawBufferPointer(start: dWeightsReturned.pointer, count: dWeightsReturned.count * stride),
            recvCounts: plan.receiveBytes, recvOffsets: plan.receiveByteOffsets, in: weightGradientTransfer)
        countIfComplete(weightGradientTransfer)
    }

    /// The weight gradients back from the experts' ranks (`startWeightGradientReturn`), by
    /// routing index for the gate.
    private func returnWeightGradients() throws {
        let assignments = routing.count
        try finishExchange(weightGradientTransfer, filling: backlog)
        growBuffer(&dWeights, toHold: max(assignments, 1), filling: 0)
        for position in 0..<assignments { dWeights[Int(plan.order[position])] = dWeightsReturned.pointer[position] }
    }

    /// The input half of the adjoint of the experts of `group` (dx, sent back at once); their
    /// weights' halves go to the backlog.
    private func runExpertsBackwardInput(_ group: Range<Int>) {
        forEachExpertBlock(in: group) { local, start, count in
            experts[local].backwardInput(dExpertOutput.row(start), rows: count, dx: dExpertInput.row(start),
                                         hidden: hidden.hidden(fromRow: start), scratch: dHidden.row(start), dxBeta: 0)
            backlog?.add(self, expert: local)
        }
    }

    /// `body(local expert, first row, rows)` for each expert of `group` with rows, in order.
    private func forEachExpertBlock(in group: Range<Int>, _ body: (Int, Int, Int) throws -> Void) rethrows {
        var start = plan.rowsPerLocalExpert[..<group.lowerBound].reduce(0, +)
        for local in group {
            let count = plan.rowsPerLocalExpert[local]
            if count > 0 { try body(local, start, count) }
            start += count
        }
    }

    /// Starts the all-to-all-v of `group`'s unit rows: out to the experts' ranks, or (`reverse`)
    /// their results back to the tokens' ranks.
    private func startExchange(reverse: Bool, group: Int, in transfer: PendingTransfer) throws {
        let stride = MemoryLayout<T>.stride
        let (source, destination) = reverse ? (unitResults, returnedResults) : (unitRows, receivedUnits)
        plan.splits(rowBytes: width * stride, reverse: reverse, group: group)
        transfer.startedAt = Clock.nanoseconds()
        try communicator.startAllToAllV(
            send: UnsafeRawBufferPointer(start: source.pointer, count: source.count * stride),
            sendCounts: plan.sendBytes, sendOffsets: plan.sendByteOffsets,
            recv: UnsafeMutableRawBufferPointer(start: destination.pointer, count: destination.count * stride),
            recvCounts: plan.receiveBytes, recvOffsets: plan.receiveByteOffsets, in: transfer)
        countIfComplete(transfer)
    }

    /// A transport without non-blocking collectives (one rank, the test ranks as threads) has
    /// completed the transfer as it started: its time is the start's, counted now, not the span
    /// until `finishExchange` looks again (the experts' whole backward, for the routing weights'
    /// gradients).
    private func countIfComplete(_ transfer: PendingTransfer) {
        if transfer.isComplete { countTime(of: transfer, until: Clock.nanoseconds()) }
    }

    /// Adds `transfer`'s time from its start to `now` to the communication total, once.
    private func countTime(of transfer: PendingTransfer, until now: UInt64) {
        if transfer.startedAt > 0 { profile.totalCommunication += Double(now - transfer.startedAt) * 1e-9 }
        transfer.startedAt = 0
    }

    /// Waits for a transfer: the wait is exposed communication; start to completion, total.
    /// With a backlog, deferred weight gradients run first, one product at a time, while the
    /// transfer is incomplete (a peer still computing); the wait left after them is `waiting`.
    private func finishExchange(_ transfer: PendingTransfer, filling backlog: ExpertGradientBacklog<T>? = nil) throws {
        if let backlog {
            try communicator.progress(transfer)
            while !transfer.isComplete {
                // A backlog product is counted as `experts` by its expert's layer (maybe this one).
                let started = Clock.nanoseconds(), countedBefore = countedSeconds
                guard backlog.runNext() else { break }
                countedSeconds = countedBefore + Double(Clock.nanoseconds() - started) * 1e-9
                try communicator.progress(transfer)
            }
        }
        let waited = Clock.nanoseconds()
        try communicator.finish(transfer)
        let now = Clock.nanoseconds(), blocked = Double(now - waited) * 1e-9
        profile.exposedCommunication += blocked
        countTime(of: transfer, until: now)
        if backlog != nil {
            profile.waitingInBackward += blocked
            countedSeconds += blocked
        }
    }
}
