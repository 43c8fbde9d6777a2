import MoEComm

/// Replicated parameters must be bit-identical on every rank (they receive identical all-reduced
/// gradients), and so must the copies of each expert when R > E (they receive gradients
/// all-reduced within their replica group). A checksum of their bits, compared by min/max
/// all-reduce, catches a rank that diverged (a bug, a bit flip, a mismatched binary) before it
/// poisons a run (`train.consistency_check_every`).
struct ReplicaCheck {
    let communicator: Communicator
    let replicaCommunicator: Communicator?
    let shardedMasters: ShardedMasters?

    /// Collective. `step`: the step just completed (1-based, for the message).
    func verify(_ model: GPTModel<Float>, afterStep step: Int) throws {
        let replicated = replicatedChecksum(model.replicated)
        if try !ReplicaCheck.agree(on: replicated, over: communicator) {
            throw TrainingError.replicasDiverged(step: step, rank: communicator.rank, checksum: String(replicated, radix: 16))
        }
        if let replicaCommunicator {
            let experts = ReplicaCheck.fnv1a(UnsafeRawBufferPointer(start: model.experts.values, count: model.experts.count * 4))
            if try !ReplicaCheck.agree(on: experts, over: replicaCommunicator) {
                throw TrainingError.expertCopiesDiverged(step: step, rank: communicator.rank, checksum: String(experts, radix: 16))
            }
        }
    }

    /// A checksum of what every rank holds of the replicated parameters: their fp32 values, or
    /// with sharded masters (each rank keeps its own slice) the bf16 copy every rank holds whole
    /// and the tensors read in fp32.
    func replicatedChecksum(_ store: ParameterStore<Float, Replicated>) -> UInt64 {
        guard let shardedMasters, let copy = store.bfloat16Values else {
            return ReplicaCheck.fnv1a(UnsafeRawBufferPointer(start: store.values, count: store.count * 4))
        }
        var checksum = ReplicaCheck.fnv1a(UnsafeRawBufferPointer(start: copy, count: store.count * 2))
        for range in shardedMasters.readRanges {
            checksum = ReplicaCheck.fnv1a(UnsafeRawBufferPointer(start: store.values + range.lowerBound, count: range.count * 4),
                                          continuing: checksum)
        }
        return checksum
    }

    /// FNV-1a over 16-bit words (`bytes.count` is even).
    static func fnv1a(_ bytes: UnsafeRawBufferPointer, continuing checksum: UInt64 = 0xcbf2_9ce4_8422_2325) -> UInt64 {
        var checksum = checksum
        for index in 0..<bytes.count / 2 {
            checksum = (checksum ^ UInt64(bytes.load(fromByteOffset: 2 * index, as: UInt16.self))) &* 0x100_0000_01b3
        }
        return checksum
    }

    /// Collective over `communicator`: true on every rank when all ranks have the same checksum.
    static func agree(on checksum: UInt64, over communicator: Communicator) throws -> Bool {
        let value = Int64(bitPattern: checksum)
        var extremes = [value, ~value]   // max of ~x is ~min of x
        try communicator.allReduce(&extremes, op: .max)
        return extremes[0] == ~extremes[1]
    }
}
