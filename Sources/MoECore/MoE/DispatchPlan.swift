import MoEComm

/// One routed assignment as its expert's rank receives it: the row of the sender's message that
/// holds its token (the sender's units for this rank, in send order) and its combine weight.
struct RoutedRow<T: Scalar> {
    var unit: Int32
    var weight: T
}

/// Where this step's kept assignments go and how their rows travel (docs/ALGORITHMS.md 12).
/// Rebuilt every step in place (no allocation once sized).
///
/// A token travels once to each rank that hosts any of its experts: one *unit* per (token,
/// destination rank), however many of that rank's experts it selected. The expert side fans a
/// unit out to its experts, and sums their weighted outputs into one result row per unit, which
/// travels back; backward sends dy once per unit and returns one dx row per unit.
///
/// With the local experts in G exchange groups (`dispatch_chunks`), a unit travels in the
/// exchange of the group of its first local expert and comes back in that of its last, so every
/// group's results leave as soon as its experts are done. Orders:
///  - assignments: (destination rank, local expert, token) = `order`; the records go in this order;
///  - units sent: (destination rank, first group, token); results returned: (rank, last group,
///    send order); a receiver keeps the same orders per source rank;
///  - expert rows: (local expert, source rank, token), each expert's rows contiguous.
struct DispatchPlan {
    /// Sorted position -> routing index (assignments grouped by expert, token order within).
    var order: [Int32] = []
    /// [E + 1] first sorted position of each global expert.
    var expertStart: [Int] = []
    var nextSlot: [Int] = []
    /// [R, E_loc] assignments to, and from, each (rank, local expert).
    var sendCounts: [Int64] = [], receiveCounts: [Int64] = []
    /// [R] assignments (records) and the first per peer, both directions.
    var sendRows: [Int] = [], sendOffsets: [Int] = [], receiveRows: [Int] = [], receiveOffsets: [Int] = []
    var rowsPerLocalExpert: [Int] = []
    var receivedRowCount = 0
    /// [E + 1] rows received per global expert summed over ranks, and the ranks that disagree.
    var receivedPerExpert: [Int64] = []

    /// Exchange groups and the group of each local expert.
    private(set) var groupCount = 1
    private var groupOfLocal: [Int] = []
    /// [R, G] units sent to each rank per exchange (by first group) and received from each;
    /// results returned to each source rank (by last group) and returned to this rank's tokens.
    var sendUnits: [Int] = [], receiveUnits: [Int] = [], resultUnits: [Int] = [], returnUnits: [Int] = []
    /// [R] first unit row per peer: sent (and returned), received (and results).
    var sendUnitStart: [Int] = [], receiveUnitStart: [Int] = []
    var sentUnitCount = 0, receivedUnitCount = 0
    /// Source side. [N * R] per (token, rank): the unit's send row and returned row (-1: none),
    /// its first and last exchange group; [U] the token of each send row; [A] each assignment's
    /// unit, counted from its destination's first send row.
    var unitSlot: [Int32] = [], returnSlot: [Int32] = []
    private var firstGroup: [Int32] = [], lastGroup: [Int32] = []
    var unitToken: [Int32] = []
    var assignmentUnit: [Int32] = []
    /// Expert side. [U_recv] each received unit's last group and its result row; [A_recv] in
    /// expert order, each row's received unit and its record, and whether it is its unit's
    /// first row (the one the sum per unit starts from).
    private var receivedLastGroup: [Int32] = []
    var resultSlot: [Int32] = []
    var expertRowUnit: [Int32] = [], expertRowRecord: [Int32] = []
    var expertRowStartsUnit: [Bool] = []
    /// This rank's own units, which never travel (the exchanges carry none of their bytes): the
    /// received units `ownReceivedUnits` are the send rows `ownSentRows`, in the same order, and
    /// so are their result rows and returned rows (the same starts).
    private(set) var ownRank = 0, ownSentRows = 0..<0, ownReceivedUnits = 0..<0
    /// [R * (E_loc + G)] both count blocks of one exchange.
    private var countsOut: [Int64] = [], countsIn: [Int64] = []
    /// [R] byte splits of one exchange.
    var sendBytes: [Int] = [], sendByteOffsets: [Int] = [], receiveBytes: [Int] = [], receiveByteOffsets: [Int] = []
    private var cursor: [Int] = []

    /// Sorts the assignments by expert, forms the units, then exchanges the counts so every rank
    /// knows what it will receive. `groupOfLocal`: the exchange group of each local expert.
    /// `countError` is added to this rank's first send count (`TrainingHooks.dispatchCountError`).
    mutating func build(tokens: [Int32], experts: [Int32], tokenCount: Int, placement: ExpertPlacement,
                        groupOfLocal: [Int], communicator: Communicator, countError: Int64) throws {
        size(placement: placement, groupOfLocal: groupOfLocal, tokenCount: tokenCount)
        sortByExpert(experts, expertCount: placement.expertCount)
        let perRank = placement.expertsPerRank
        for index in sendCounts.indices { sendCounts[index] = 0 }
        for e in 0..<placement.expertCount {
            sendCounts[placement.owner(of: e) * perRank + placement.localIndex(of: e)] = Int64(expertStart[e + 1] - expertStart[e])
        }
        sendCounts[placement.groupBase * perRank] += countError
        formUnits(tokens: tokens, experts: experts, tokenCount: tokenCount, placement: placement)
        try exchangeCounts(placement: placement, communicator: communicator)
        try sumRows(placement: placement, rank: communicator.rank)
        ownRank = communicator.rank
        let ownUnits = (0..<groupCount).reduce(0) { $0 + sendUnits[ownRank * groupCount + $1] }
        ownSentRows = sendUnitStart[ownRank]..<(sendUnitStart[ownRank] + ownUnits)
        ownReceivedUnits = receiveUnitStart[ownRank]..<(receiveUnitStart[ownRank] + ownUnits)
    }

    private mutating func size(placement: ExpertPlacement, groupOfLocal: [Int], tokenCount: Int) {
        let ranks = placement.rankCount, perRank = placement.expertsPerRank
        groupCount = (groupOfLocal.last ?? 0) + 1
        self.groupOfLocal = groupOfLocal
        if sendCounts.count != ranks * perRank || sendUnits.count != ranks * groupCount {
            sendCounts = Array(repeating: 0, count: ranks * perRank)
            receiveCounts = sendCounts
            sendRows = Array(repeating: 0, count: ranks)
            sendOffsets = sendRows; receiveRows = sendRows; receiveOffsets = sendRows
            sendBytes = sendRows; sendByteOffsets = sendRows; receiveBytes = sendRows; receiveByteOffsets = sendRows
            sendUnitStart = sendRows; receiveUnitStart = sendRows
            rowsPerLocalExpert = Array(repeating: 0, count: perRank)
            sendUnits = Array(repeating: 0, count: ranks * groupCount)
            receiveUnits = sendUnits; resultUnits = sendUnits; returnUnits = sendUnits; cursor = sendUnits
            countsOut = Array(repeating: 0, count: ranks * (perRank + groupCount)); countsIn = countsOut
        }
        growBuffer(&unitSlot, toHold: tokenCount * ranks, filling: 0)
        growBuffer(&returnSlot, toHold: tokenCount * ranks, filling: 0)
        growBuffer(&firstGroup, toHold: tokenCount * ranks, filling: 0)
        growBuffer(&lastGroup, toHold: tokenCount * ranks, filling: 0)
    }

    /// Counting sort by expert (stable: token order within an expert).
    private mutating func sortByExpert(_ experts: [Int32], expertCount: Int) {
        if expertStart.count != expertCount + 1 { expertStart = Array(repeating: 0, count: expertCount + 1); nextSlot = expertStart }
        for e in 0...expertCount { expertStart[e] = 0 }
        for e in experts { expertStart[Int(e) + 1] += 1 }
        for e in 0..<expertCount { expertStart[e + 1] += expertStart[e] }
        growBuffer(&order, toHold: experts.count, filling: 0)
        for e in 0...expertCount { nextSlot[e] = expertStart[e] }
        for (j, e) in experts.enumerated() {
            order[nextSlot[Int(e)]] = Int32(j)
            nextSlot[Int(e)] += 1
        }
    }

    /// One unit per (token, rank) the token's assignments reach: its first and last group, its
    /// send row (rank, first group, token) and returned row (rank, last group, send order).
    private mutating func formUnits(tokens: [Int32], experts: [Int32], tokenCount: Int, placement: ExpertPlacement) {
        let ranks = placement.rankCount, groups = groupCount
        for index in 0..<(tokenCount * ranks) { firstGroup[index] = Int32(groups); lastGroup[index] = -1; unitSlot[index] = -1; returnSlot[index] = -1 }
        for j in tokens.indices {
            let e = Int(experts[j]), index = Int(tokens[j]) * ranks + placement.owner(of: e)
            let group = Int32(groupOfLocal[placement.localIndex(of: e)])
            firstGroup[index] = min(firstGroup[index], group)
            lastGroup[index] = max(lastGroup[index], group)
        }
        for index in sendUnits.indices { sendUnits[index] = 0; returnUnits[index] = 0 }
        for index in 0..<(tokenCount * ranks) where lastGroup[index] >= 0 {
            let peer = index % ranks
            sendUnits[peer * groups + Int(firstGroup[index])] += 1
            returnUnits[peer * groups + Int(lastGroup[index])] += 1
        }
        sentUnitCount = DispatchPlan.starts(sendUnits, groups: groups, into: &sendUnitStart, cursor: &cursor)
        growBuffer(&unitToken, toHold: sentUnitCount, filling: 0)
        for s in 0..<tokenCount {
            for peer in 0..<ranks where lastGroup[s * ranks + peer] >= 0 {
                let slot = peer * groups + Int(firstGroup[s * ranks + peer])
                unitSlot[s * ranks + peer] = Int32(cursor[slot])
                unitToken[cursor[slot]] = Int32(s)
                cursor[slot] += 1
            }
        }
        // Returned rows: (rank, last group, send order); per peer the same starts as sent rows.
        _ = DispatchPlan.starts(returnUnits, groups: groups, into: &sendUnitStart, cursor: &cursor)
        for peer in 0..<ranks {
            let end = peer + 1 < ranks ? sendUnitStart[peer + 1] : sentUnitCount
            for row in sendUnitStart[peer]..<end {
                let index = Int(unitToken[row]) * ranks + peer, slot = peer * groups + Int(lastGroup[index])
                returnSlot[index] = Int32(cursor[slot])
                cursor[slot] += 1
            }
        }
        growBuffer(&assignmentUnit, toHold: tokens.count, filling: 0)
        for position in 0..<tokens.count {
            let j = Int(order[position]), peer = placement.owner(of: Int(experts[j]))
            assignmentUnit[position] = unitSlot[Int(tokens[j]) * ranks + peer] - Int32(sendUnitStart[peer])
        }
    }

    /// First row of each peer's block ([R] `start`) and of each (peer, group) block (`cursor`,
    /// [R, G]) in a buffer ordered (peer, group); returns the total.
    private static func starts(_ counts: [Int], groups: Int, into start: inout [Int], cursor: inout [Int]) -> Int {
        var total = 0
        for peer in start.indices {
            start[peer] = total
            for group in 0..<groups { cursor[peer * groups + group] = total; total += counts[peer * groups + group] }
        }
        return total
    }

    /// One all-to-all of [assignments per local expert, units per group] per peer.
    private mutating func exchangeCounts(placement: ExpertPlacement, communicator: Communicator) throws {
        let perRank = placement.expertsPerRank, groups = groupCount, block = perRank + groups
        for peer in 0..<placement.rankCount {
            for local in 0..<perRank { countsOut[peer * block + local] = sendCounts[peer * perRank + local] }
            for group in 0..<groups { countsOut[peer * block + perRank + group] = Int64(sendUnits[peer * groups + group]) }
        }
        try countsOut.withUnsafeBufferPointer { send in
            try countsIn.withUnsafeMutableBufferPointer { receive in
                try communicator.allToAll(send: send, recv: receive, blockCount: block)
            }
        }
        for peer in 0..<placement.rankCount {
            for local in 0..<perRank { receiveCounts[peer * perRank + local] = countsIn[peer * block + local] }
            for group in 0..<groups {
                let units = countsIn[peer * block + perRank + group]
                guard units >= 0, units <= Int64(Int32.max) else {
                    throw CommError.mismatch(operation: "MoE count exchange", rank: communicator.rank, detail: "rank \(peer) announced \(units) token rows")
                }
                receiveUnits[peer * groups + group] = Int(units)
            }
        }
        receivedUnitCount = DispatchPlan.starts(receiveUnits, groups: groups, into: &receiveUnitStart, cursor: &cursor)
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

    /// Bytes this rank sends to other ranks in one forward and backward: token rows out and
    /// result rows back in both passes, the records forward and their weight gradients back.
    func bytesSentToOtherRanks(rank: Int, rowBytes: Int, recordBytes: Int, scalarBytes: Int) -> Int {
        var bytes = 0
        for peer in 0..<sendRows.count where peer != rank {
            let unitsOut = (0..<groupCount).reduce(0) { $0 + sendUnits[peer * groupCount + $1] }
            let unitsBack = (0..<groupCount).reduce(0) { $0 + receiveUnits[peer * groupCount + $1] }
            bytes += 2 * (unitsOut + unitsBack) * rowBytes + sendRows[peer] * recordBytes + receiveRows[peer] * scalarBytes
        }
        return bytes
    }

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

    /// Expert side, once the records are in: each received unit's last group and result row,
    /// and each expert row's unit and record. A record naming a unit its sender did not send, or
    /// one that arrives after its expert's group, is a corrupted exchange.
    mutating func mapReceived<T>(_ records: UnsafeBufferPointer<RoutedRow<T>>, perRank: Int, rank: Int) throws {
        let groups = groupCount
        growBuffer(&receivedLastGroup, toHold: receivedUnitCount, filling: 0)
        growBuffer(&resultSlot, toHold: receivedUnitCount, filling: 0)
        for index in resultUnits.indices { resultUnits[index] = 0 }
        for peer in receiveUnitStart.indices {
            // Units arrive by first group; records by local expert, so a unit's group only grows.
            let start = receiveUnitStart[peer]
            var row = start
            for group in 0..<groups {
                for _ in 0..<receiveUnits[peer * groups + group] { receivedLastGroup[row] = Int32(group); row += 1 }
            }
            var record = receiveOffsets[peer]
            for local in 0..<perRank {
                let group = Int32(groupOfLocal[local])
                for _ in 0..<Int(receiveCounts[peer * perRank + local]) {
                    let unit = Int(records[record].unit)
                    guard unit >= 0, start + unit < row, receivedLastGroup[start + unit] <= group else {
                        throw CommError.mismatch(operation: "MoE dispatch", rank: rank,
                                                 detail: "rank \(peer) sent a record for token row \(unit) of its \(row - start)")
                    }
                    receivedLastGroup[start + unit] = group
                    record += 1
                }
            }
            for unit in start..<row { resultUnits[peer * groups + Int(receivedLastGroup[unit])] += 1 }
        }
        // The result rows: (source rank, last group, receive order); per peer the same starts.
        _ = DispatchPlan.starts(resultUnits, groups: groups, into: &receiveUnitStart, cursor: &cursor)
        for peer in receiveUnitStart.indices {
            let end = peer + 1 < receiveUnitStart.count ? receiveUnitStart[peer + 1] : receivedUnitCount
            for unit in receiveUnitStart[peer]..<end {
                let slot = peer * groups + Int(receivedLastGroup[unit])
                resultSlot[unit] = Int32(cursor[slot])
                cursor[slot] += 1
            }
        }
        mapExpertRows(records, perRank: perRank)
    }

    /// Expert order (local expert, source rank, token): each row's received unit and record.
    private mutating func mapExpertRows<T>(_ records: UnsafeBufferPointer<RoutedRow<T>>, perRank: Int) {
        growBuffer(&expertRowUnit, toHold: receivedRowCount, filling: 0)
        growBuffer(&expertRowRecord, toHold: receivedRowCount, filling: 0)
        growBuffer(&expertRowStartsUnit, toHold: receivedRowCount, filling: false)
        // receivedLastGroup is done with: it marks the units seen so far (-1).
        var row = 0
        for local in 0..<perRank {
            for peer in receiveUnitStart.indices {
                var record = receiveOffsets[peer]
                for previous in 0..<local { record += Int(receiveCounts[peer * perRank + previous]) }
                for _ in 0..<Int(receiveCounts[peer * perRank + local]) {
                    let unit = receiveUnitStart[peer] + Int(records[record].unit)
                    expertRowUnit[row] = Int32(unit)
                    expertRowRecord[row] = Int32(record)
                    expertRowStartsUnit[row] = receivedLastGroup[unit] >= 0
                    receivedLastGroup[unit] = -1
                    row += 1
                    record += 1
                }
            }
        }
    }

    /// The byte splits of group `group`'s exchange of rows of `rowBytes`: units out to the
    /// experts' ranks, or (`reverse`) results back to the tokens' ranks; none to this rank itself.
    mutating func splits(rowBytes: Int, reverse: Bool, group: Int) {
        let groups = groupCount
        for peer in sendRows.indices {
            let outCounts = reverse ? resultUnits : sendUnits, inCounts = reverse ? returnUnits : receiveUnits
            let outStart = reverse ? receiveUnitStart[peer] : sendUnitStart[peer]
            let inStart = reverse ? sendUnitStart[peer] : receiveUnitStart[peer]
            let outBefore = (0..<group).reduce(0) { $0 + outCounts[peer * groups + $1] }
            let inBefore = (0..<group).reduce(0) { $0 + inCounts[peer * groups + $1] }
            sendBytes[peer] = outCounts[peer * groups + group] * rowBytes
            sendByteOffsets[peer] = (outStart + outBefore) * rowBytes
            receiveBytes[peer] = inCounts[peer * groups + group] * rowBytes
            receiveByteOffsets[peer] = (inStart + inBefore) * rowBytes
        }
        (sendBytes[ownRank], receiveBytes[ownRank]) = (0, 0)
    }

    /// The byte splits of the records' exchange (one `recordBytes` per assignment), or
    /// (`reverse`) of their weight gradients coming back.
    mutating func recordSplits(recordBytes: Int, reverse: Bool) {
        for peer in sendRows.indices {
            sendBytes[peer] = (reverse ? receiveRows[peer] : sendRows[peer]) * recordBytes
            sendByteOffsets[peer] = (reverse ? receiveOffsets[peer] : sendOffsets[peer]) * recordBytes
            receiveBytes[peer] = (reverse ? sendRows[peer] : receiveRows[peer]) * recordBytes
            receiveByteOffsets[peer] = (reverse ? sendOffsets[peer] : receiveOffsets[peer]) * recordBytes
        }
    }

    /// The expert rows of `group`'s local experts (expert order).
    func expertRows(of group: Range<Int>) -> Range<Int> {
        let start = rowsPerLocalExpert[..<group.lowerBound].reduce(0, +)
        return start..<(start + rowsPerLocalExpert[group].reduce(0, +))
    }
}
