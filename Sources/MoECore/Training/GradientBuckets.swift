import MoEComm

/// The replicated gradients' all-reduce, overlapped with backward (docs/ARCHITECTURE.md, "One
/// training step"): one bucket per block, started with a non-blocking all-reduce as soon as the
/// block's backward has finished (blocks finish last to first), and one bucket per remaining
/// range (embeddings, final norm, head: the tied embedding gets its last contribution at the
/// very end), started after backward. `finish` completes them all before the optimizer.
///
/// Summing in buckets gives every element the same sum as one all-reduce of the whole buffer on
/// 2 ranks (a + b either way); on more ranks MPI may pick another reduction order per message
/// size, a last-bit difference like any change of rank count.
final class GradientBuckets {
    /// Element ranges of the replicated store: by block, and the rest.
    let blockRanges: [Range<Int>]
    let otherRanges: [Range<Int>]
    /// One transfer per bucket, reused every step; the first `started` were started this step
    /// (the others are complete, so progress and finish pass over them).
    private let transfers: [PendingTransfer]
    private var started = 0
    private var firstStarted: UInt64?

    /// nil when a block's parameters are not contiguous in the store (then no overlap).
    init?(entries: [ParameterEntry], layers: Int) {
        var blocks = [Range<Int>?](repeating: nil, count: layers), counts = [Int](repeating: 0, count: layers)
        var others: [Range<Int>] = []
        for entry in entries.sorted(by: { $0.offset < $1.offset }) {
            let range = entry.offset..<(entry.offset + entry.count)
            if let layer = entry.block, layer < layers {
                blocks[layer] = blocks[layer].map { min($0.lowerBound, range.lowerBound)..<max($0.upperBound, range.upperBound) } ?? range
                counts[layer] += entry.count
            } else if let last = others.last, last.upperBound == range.lowerBound {
                others[others.count - 1] = last.lowerBound..<range.upperBound
            } else {
                others.append(range)
            }
        }
        guard zip(blocks, counts).allSatisfy({ $0.0 == nil || $0.0!.count == $0.1 }) else { return nil }
        blockRanges = blocks.map { $0 ?? 0..<0 }
        otherRanges = others
        transfers = (0..<(blocks.count + others.count)).map { _ in PendingTransfer() }
    }

    func start(_ range: Range<Int>, of gradients: UnsafeMutablePointer<Float>, communicator: Communicator) throws {
        guard !range.isEmpty else { return }
        if firstStarted == nil { firstStarted = Clock.nanoseconds() }
        try communicator.startAllReduceSum(
            UnsafeMutableRawBufferPointer(start: gradients + range.lowerBound, count: range.count * MemoryLayout<Float>.stride),
            type: .float32, in: transfers[started])
        started += 1
        // Starting a transfer also lets the earlier ones move on.
        try communicator.progress(transfers)
    }

    /// Starts the remaining ranges, waits for every bucket, and returns the seconds from the
    /// first bucket's start to the last one's completion.
    func finish(_ gradients: UnsafeMutablePointer<Float>, communicator: Communicator) throws -> Double {
        for range in otherRanges { try start(range, of: gradients, communicator: communicator) }
        try communicator.finish(transfers)
        defer { started = 0; firstStarted = nil }
        return firstStarted.map { Double(Clock.nanoseconds() - $0) * 1e-9 } ?? 0
    }
}
