import MoEComm

/// ZeRO stage 1 in bf16 mode (`train.shard_optimizer` with bf16 products): besides the AdamW
/// moments, the fp32 master values of the replicated parameters are sharded too. Rank r keeps
/// the masters of its optimizer slice, plus, whole, the tensors read in fp32 (norms, biases,
/// embeddings, routers: everything not `productOnly`, a small part of the store); the pages of
/// the other masters are released. The matrix products read the bf16 copy, which every rank
/// holds whole.
///
/// After each update (the optimizer wrote its slice and that slice's bf16 copy) two
/// all-gathers rebuild every rank's inputs: the bf16 copy, by slices (2 bytes per parameter
/// instead of the 4 of gathering fp32 values), and the fp32-read tensors' values, packed: the
/// part of them inside each rank's slice is contiguous in the packed order.
final class ShardedMasters {
    /// Every rank's slice of the flat store (the optimizers' shards), and their lengths (what the
    /// collectives take, every step).
    let slices: [Range<Int>]
    let sliceCounts: [Int]
    let rank: Int
    /// The flat ranges of the tensors read in fp32, in store order.
    let readRanges: [Range<Int>]
    /// Per rank: how many fp32-read values lie inside its slice (its block of `packed`).
    let packedCounts: [Int]
    /// Where this rank's block starts in `packed`.
    let packedStart: Int
    /// The fp32-read values, packed in store order (reused every step).
    var packed: [Float]

    init(entries: [ParameterEntry], slices: [Range<Int>], rank: Int) {
        self.slices = slices
        sliceCounts = slices.map(\.count)
        self.rank = rank
        let readRanges = entries.filter { !$0.productOnly }.map { $0.offset..<($0.offset + $0.count) }
        self.readRanges = readRanges
        packedCounts = slices.map { slice in readRanges.reduce(0) { $0 + $1.clamped(to: slice).count } }
        packedStart = packedCounts[..<rank].reduce(0, +)
        packed = [Float](repeating: 0, count: packedCounts.reduce(0, +))
    }

    /// The values this rank keeps: its slice and the fp32-read tensors, merged, sorted.
    var kept: [Range<Int>] {
        var merged: [Range<Int>] = []
        for range in (readRanges + [slices[rank]]).sorted(by: { $0.lowerBound < $1.lowerBound }) where !range.isEmpty {
            if let last = merged.last, range.lowerBound <= last.upperBound {
                merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
            } else {
                merged.append(range)
            }
        }
        return merged
    }

    /// After an update: every rank's slice of the bf16 copy and of the fp32-read values reaches
    /// every rank (collective).
    func gather(_ store: ParameterStore<Float, Replicated>, over communicator: Communicator) throws {
        guard let copy = store.bfloat16Values else { preconditionFailure("sharded masters need the bf16 copy") }
        try communicator.allGather(UnsafeMutableBufferPointer(start: copy, count: store.count), blockCounts: sliceCounts)
        let values = store.values, slice = slices[rank], readRanges = self.readRanges
        try packed.withUnsafeMutableBufferPointer { packed in
            var position = packedStart
            for range in readRanges {
                let part = range.clamped(to: slice)
                (packed.baseAddress! + position).update(from: values + part.lowerBound, count: part.count)
                position += part.count
            }
            try communicator.allGather(packed, blockCounts: packedCounts)
            position = 0
            for range in readRanges {
                (values + range.lowerBound).update(from: packed.baseAddress! + position, count: range.count)
                position += range.count
            }
        }
    }

    /// Runs `body` with every master value present on this rank: they are all-gathered by slices
    /// first, and the ones this rank does not keep are released again after (collective), with
    /// the bf16 copy refreshed first when `body` writes them. For the rare readers of whole fp32
    /// values: checkpoints, EvoMoE's spawn.
    func withAllValues<R>(_ store: ParameterStore<Float, Replicated>, over communicator: Communicator,
                          writing: Bool, _ body: () throws -> R) throws -> R {
        try communicator.allGather(UnsafeMutableBufferPointer(start: store.values, count: store.count), blockCounts: sliceCounts)
        defer { if writing { store.didWriteAllValues() } else { store.releaseValuesNotKept() } }
        return try body()
    }
}
