import MoEComm

/// Where this step's kept assignments go and how many rows come back (docs/ALGORITHMS.md 12):
/// the assignments sorted by expert, the rows for every (rank, local expert) both ways, and the
/// byte splits of one all-to-all-v. Rebuilt every step in place (no allocation once sized).
///
/// Orders: the send buffer is (destination rank, local expert, token); the receive buffer is
/// (source rank, local expert, token); the experts read (local expert, source rank, token).
struct DispatchPlan {
    /// Sorted position -> routing index (assignments grouped by expert, token order within).
    var order: [Int32] = []
    /// [E + 1] first sorted position of each global expert.
    var expertStart: [Int] = []
    var nextSlot: [Int] = []
    /// [R, E_loc] rows to, and from, each (rank, local expert).
    var sendCounts: [Int64] = [], receiveCounts: [Int64] = []
    /// [R] rows and first row per peer, both directions.
    var sendRows: [Int] = [], sendOffsets: [Int] = [], receiveRows: [Int] = [], receiveOffsets: [Int] = []
    var rowsPerLocalExpert: [Int] = []
    var receivedRowCount = 0
    /// [R] byte splits of one exchange.
    var sendBytes: [Int] = [], sendByteOffsets: [Int] = [], receiveBytes: [Int] = [], receiveByteOffsets: [Int] = []
    /// [E + 1] rows received per global expert summed over ranks, and the ranks that disagree.
    var receivedPerExpert: [Int64] = []

    /// Sorts the assignments by expert, then exchanges the counts so every rank knows what it
    /// will receive. `countError` is added to this rank's first send count (`TrainingHooks.dispatchCountError`).
    mutating func build(_ experts: [Int32], placement: ExpertPlacement, communicator: Communicator, countError: Int64) throws {
        sortByExpert(experts, expertCount: placement.expertCount)
        let ranks = placement.rankCount, perRank = placement.expertsPerRank
        if sendCounts.count != ranks * perRank {
            sendCounts = Array(repeating: 0, count: ranks * perRank)
            receiveCounts = sendCounts
            sendRows = Array(repeating: 0, count: ranks)
            sendOffsets = sendRows; receiveRows = sendRows; receiveOffsets = sendRows
            sendBytes = sendRows; sendByteOffsets = sendRows; receiveBytes = sendRows; receiveByteOffsets = sendRows
            rowsPerLocalExpert = Array(repeating: 0, count: perRank)
        }
        for index in sendCounts.indices { sendCounts[index] = 0 }
        for e in 0..<placement.expertCount {
            sendCounts[placement.owner(of: e) * perRank + placement.localIndex(of: e)] = Int64(expertStart[e + 1] - expertStart[e])
        }
        sendCounts[placement.groupBase * perRank] += countError
        try sendCounts.withUnsafeBufferPointer { send in
            try receiveCounts.withUnsafeMutableBufferPointer { receive in
                try communicator.allToAll(send: send, recv: receive, blockCount: perRank)
            }
        }
        try sumRows(placement: placement, rank: communicator.rank)
    }

    /// Counting sort by expert (stable: token order within an expert).
    private mutating func sortByExpert(_ experts: [Int32], expertCount: Int) {
        if expertStart.count != expertCount + 1 { expertStart = Array(repeating: 0, count: expertCount + 1); nextSlot = expertStart }
        for e in 0...expertCount { expertStart[e] = 0 }
        for e in experts { expertStart[Int(e) + 1] += 1 }
        for e in 0..<expertCount { expertStart[e + 1] += expertStart[e] }
        if order.count < experts.count { order = Array(repeating: 0, count: experts.count) }
        for e in 0...expertCount { nextSlot[e] = expertStart[e] }
        for (j, e) in experts.enumerated() {
            order[nextSlot[Int(e)]] = Int32(j)
            nextSlot[Int(e)] += 1
        }
    }

    /// Rows this rank sends to other ranks in one pass's two exchanges (its tokens' rows out to
    /// the experts' ranks, the results of its experts back): self-addressed rows stay in memory.
    func rowsSentToOtherRanks(rank: Int) -> Int {
        var rows = 0
        for peer in 0..<sendRows.count where peer != rank { rows += sendRows[peer] + receiveRows[peer] }
        return rows
    }

    /// Rows and offsets per peer from the exchanged counts; a negative or absurd count is an
    /// error (a corrupted exchange), before any buffer is sized by it.
    private mutating func sumRows(placement: ExpertPlacement, rank: Int) throws {
        let perRank = placement.expertsPerRank
        var sendTotal = 0, receiveTotal = 0
        for peer in 0..<placement.rankCount {
            sendOffsets[peer] = sendTotal
            receiveOffsets[peer] = receiveTotal
            sendRows[peer] = 0
            receiveRows[peer] = 0
            for local in 0..<perRank {
                sendRows[peer] += Int(sendCounts[peer * perRank + local])
                let received = receiveCounts[peer * perRank + local]
                guard received >= 0, received <= Int64(Int32.max) else {
                    throw CommError.mismatch(operation: "MoE count exchange", rank: rank, detail: "rank \(peer) announced \(received) rows")
                }
                receiveRows[peer] += Int(received)
            }
            sendTotal += sendRows[peer]
            receiveTotal += receiveRows[peer]
        }
        for local in 0..<perRank {
            rowsPerLocalExpert[local] = (0..<placement.rankCount).reduce(0) { $0 + Int(receiveCounts[$1 * perRank + local]) }
        }
        receivedRowCount = receiveTotal
    }

    var sentRowCount: Int { sendRows.reduce(0, +) }

    /// The exchanged counts must add up to what the gate kept: summed over ranks, the rows each
    /// expert receives equal its global kept count (the gate's own all-reduce). Every rank sees the
    /// same sums, so every rank throws together: none is left waiting in the exchange that follows.
    mutating func validate(keptPerExpert: [Int64], assignments: Int, placement: ExpertPlacement,
                           communicator: Communicator, layer: Int) throws {
        let experts = placement.expertCount
        if receivedPerExpert.count != experts + 1 { receivedPerExpert = Array(repeating: 0, count: experts + 1) }
        for e in 0...experts { receivedPerExpert[e] = 0 }
        for local in 0..<placement.expertsPerRank {
            receivedPerExpert[placement.localExperts.lowerBound + local] = Int64(rowsPerLocalExpert[local])
        }
        // Last slot: ranks whose send total disagrees with their own routing.
        receivedPerExpert[experts] = sentRowCount == assignments ? 0 : 1
        try communicator.allReduce(&receivedPerExpert)
        for e in 0..<experts where receivedPerExpert[e] != keptPerExpert[e] || receivedPerExpert[experts] != 0 {
            throw CommError.mismatch(
                operation: "MoE dispatch (layer \(layer))", rank: communicator.rank,
                detail: "expert \(e) is announced \(receivedPerExpert[e]) rows but the gate kept \(keptPerExpert[e]) "
                    + "(\(receivedPerExpert[experts]) rank(s) send counts that disagree with their routing)")
        }
    }

    /// Fills the byte splits of one all-to-all-v of rows of `rowBytes` restricted to the local
    /// experts `group` (every peer's rows for them are contiguous on both sides): forward sends
    /// the assignments, `reverse` (the results going back) swaps the two sides.
    mutating func splits(rowBytes: Int, reverse: Bool, group: Range<Int>, perRank: Int) {
        for peer in sendRows.indices {
            var sent = 0, sentBefore = 0, received = 0, receivedBefore = 0
            for local in 0..<group.upperBound {
                let toPeer = Int(sendCounts[peer * perRank + local]), fromPeer = Int(receiveCounts[peer * perRank + local])
                if local < group.lowerBound { sentBefore += toPeer; receivedBefore += fromPeer } else { sent += toPeer; received += fromPeer }
            }
            let sendOffset = sendOffsets[peer] + sentBefore, receiveOffset = receiveOffsets[peer] + receivedBefore
            sendBytes[peer] = (reverse ? received : sent) * rowBytes
            sendByteOffsets[peer] = (reverse ? receiveOffset : sendOffset) * rowBytes
            receiveBytes[peer] = (reverse ? sent : received) * rowBytes
            receiveByteOffsets[peer] = (reverse ? sendOffset : receiveOffset) * rowBytes
        }
    }

    /// Calls body(from, to, rows) for every (source rank, local expert in `group`) block, moving
    /// it between (source, local expert) order and (local expert, source) order.
    func forEachBlock(toExpertOrder: Bool, perRank: Int, group: Range<Int>, _ body: (_ from: Int, _ to: Int, _ rows: Int) -> Void) {
        var expertOrderOffset = rowsPerLocalExpert[..<group.lowerBound].reduce(0, +)
        for local in group {
            for peer in receiveRows.indices {
                var sourceOrderOffset = receiveOffsets[peer]
                for previous in 0..<local { sourceOrderOffset += Int(receiveCounts[peer * perRank + previous]) }
                let count = Int(receiveCounts[peer * perRank + local])
                if count > 0 {
                    body(toExpertOrder ? sourceOrderOffset : expertOrderOffset, toExpertOrder ? expertOrderOffset : sourceOrderOffset, count)
                }
                expertOrderOffset += count
            }
        }
    }
}
