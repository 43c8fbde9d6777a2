/// The collective operations the trainer needs, independent of the transport.
///
/// Implementations: `SingleRankCommunicator` (one process, no MPI), `MPICommunicator` (OpenMPI).
/// Every operation is collective: all ranks call it in the same order with matching sizes.
/// Buffers are typed through `CommElement`, so a call cannot mix element types by accident.
public protocol Communicator: AnyObject {
    var rank: Int { get }
    var size: Int { get }

    /// Element-wise reduction over all ranks, in place.
    func allReduce(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, op: ReduceOp) throws
    /// Exclusive prefix sum over ranks, in place: rank r receives the sum of ranks 0..<r
    /// (rank 0 receives zeros).
    func exclusiveScanSum(_ buffer: UnsafeMutableBufferPointer<Int64>) throws
    /// Every rank sends `blockCount` values to every rank: `send[dest*blockCount ..< +blockCount]`
    /// arrives at `dest` as `recv[source*blockCount ..< +blockCount]`.
    func allToAll(send: UnsafeBufferPointer<Int64>, recv: UnsafeMutableBufferPointer<Int64>, blockCount: Int) throws
    /// Variable-size all-to-all. Counts and displacements are in bytes, one per rank.
    func allToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                   recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int]) throws
    /// Element-wise sum over all ranks of the whole buffer, of which rank r needs only block r:
    /// the blocks lie back to back, `blockCounts[r]` elements each. Afterwards this rank's block
    /// holds the sums; the rest of the buffer is undefined. (ZeRO's gradient reduce-scatter.)
    func reduceScatterSum(_ buffer: UnsafeMutableRawBufferPointer, blockCounts: [Int], type: CommDataType) throws
    /// Every rank contributes its block of `buffer` (blocks back to back, `blockByteCounts[r]`
    /// bytes each); afterwards every rank holds every block. (ZeRO's parameter all-gather.)
    func allGather(_ buffer: UnsafeMutableRawBufferPointer, blockByteCounts: [Int]) throws
    /// Starts an in-place sum all-reduce in `transfer` (complete, or finished, before) and
    /// returns: the buffer must stay untouched until `finish` returns for it. Transfers complete
    /// in the order they were started on every rank.
    func startAllReduceSum(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, in transfer: PendingTransfer) throws
    /// Starts an all-to-all-v (as `allToAllV`, counts in bytes) in `transfer` and returns:
    /// neither buffer may be touched until `finish` returns for it.
    func startAllToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                        recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int], in transfer: PendingTransfer) throws
    /// Lets a started transfer move on (MPI progresses only inside MPI calls); never blocks.
    func progress(_ transfer: PendingTransfer) throws
    /// Blocks until `transfer` has completed.
    func finish(_ transfer: PendingTransfer) throws
    /// Copies `buffer` from `root` to every rank.
    func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws
    func barrier() throws
    /// Partitions the ranks: those passing the same `color` form a new communicator, ranked by
    /// (`key`, old rank). Collective over this communicator.
    func split(color: Int, key: Int) throws -> Communicator
    /// Ends the whole job (every rank) with `code`. Used when one rank cannot go on.
    func abort(code: Int32) -> Never
}

public enum ReduceOp: Sendable { case sum, max, min }

/// A started, possibly unfinished transfer (`Communicator.startAllReduceSum`). The caller owns
/// it and starts one transfer after another in it, so a training step allocates none. Transports
/// without non-blocking collectives finish a transfer before the start returns.
public final class PendingTransfer {
    /// The transport's handle (an `MPI_Request` for MPI; nil when complete).
    public var handle: OpaquePointer?
    /// When the caller started it (for accounting), in its clock's nanoseconds; 0 once its time
    /// is counted.
    public var startedAt: UInt64 = 0
    /// Arguments the transport must keep unchanged until completion (MPI's count arrays).
    private var retained = UnsafeMutableBufferPointer<Int32>(start: nil, count: 0)
    public init() {}
    public var isComplete: Bool { handle == nil }

    /// Storage for `count` values that must outlive the call starting the transfer; kept for the
    /// next transfer, grown only when one needs more.
    public func retainedStorage(count: Int) -> UnsafeMutableBufferPointer<Int32> {
        precondition(isComplete, "a transfer is restarted before it finished")
        if retained.count < count {
            retained.deallocate()
            retained = .allocate(capacity: count)
        }
        return retained
    }

    deinit { retained.deallocate() }
}

extension Communicator {
    /// Lets each started transfer move on.
    public func progress(_ transfers: [PendingTransfer]) throws {
        for transfer in transfers where !transfer.isComplete { try progress(transfer) }
    }

    /// Blocks until every transfer has completed.
    public func finish(_ transfers: [PendingTransfer]) throws {
        for transfer in transfers where !transfer.isComplete { try finish(transfer) }
    }
}

public enum CommDataType: Sendable {
    case float32, float64, int64
    public var byteCount: Int { self == .float32 ? 4 : 8 }
}

/// Element types the communicator can reduce.
public protocol CommElement {
    static var commType: CommDataType { get }
}
extension Float: CommElement { public static var commType: CommDataType { .float32 } }
extension Double: CommElement { public static var commType: CommDataType { .float64 } }
extension Int64: CommElement { public static var commType: CommDataType { .int64 } }

public enum CommError: Error, CustomStringConvertible {
    case mpi(operation: String, rank: Int, code: Int32, message: String)
    case mismatch(operation: String, rank: Int, detail: String)
    case aborted(rank: Int)

    public var description: String {
        switch self {
        case let .mpi(operation, rank, code, message):
            return "MPI error on rank \(rank) in \(operation) (code \(code)): \(message)"
        case let .mismatch(operation, rank, detail):
            return "inconsistent \(operation) on rank \(rank): \(detail)"
        case let .aborted(rank):
            return "rank \(rank): the job was aborted by another rank"
        }
    }
}

extension Communicator {
    public var isCoordinator: Bool { rank == 0 }

    /// Blocking fallback: the all-reduce runs at once, so the transfer is complete when returned.
    public func startAllReduceSum(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, in transfer: PendingTransfer) throws {
        try allReduce(buffer, type: type, op: .sum)
    }
    public func startAllToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                               recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int], in transfer: PendingTransfer) throws {
        try allToAllV(send: send, sendCounts: sendCounts, sendOffsets: sendOffsets, recv: recv, recvCounts: recvCounts, recvOffsets: recvOffsets)
    }
    public func progress(_ transfer: PendingTransfer) throws {}
    public func finish(_ transfer: PendingTransfer) throws {}

    public func allReduce<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOp = .sum) throws {
        try allReduce(UnsafeMutableRawBufferPointer(buffer), type: T.commType, op: op)
    }

    /// Reduces an array in place (convenience for small statistics, not for hot paths).
    public func allReduce<T: CommElement>(_ values: inout [T], op: ReduceOp = .sum) throws {
        try values.withUnsafeMutableBufferPointer { try allReduce($0, op: op) }
    }

    /// One value (allocates a one-element array: not for per-step hot paths).
    public func allReduce<T: CommElement>(_ value: T, op: ReduceOp = .sum) throws -> T {
        var values = [value]
        try allReduce(&values, op: op)
        return values[0]
    }

    public func reduceScatterSum<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, blockCounts: [Int]) throws {
        try reduceScatterSum(UnsafeMutableRawBufferPointer(buffer), blockCounts: blockCounts, type: T.commType)
    }

    /// All-gather of typed blocks; counts in elements of `T`.
    public func allGather<T>(_ buffer: UnsafeMutableBufferPointer<T>, blockCounts: [Int]) throws {
        try allGather(UnsafeMutableRawBufferPointer(buffer), blockByteCounts: blockCounts.map { $0 * MemoryLayout<T>.stride })
    }

    /// Variable-size all-to-all of typed rows; counts and offsets are in elements of `T`.
    public func allToAllV<T>(send: UnsafeBufferPointer<T>, sendCounts: [Int], sendOffsets: [Int],
                             recv: UnsafeMutableBufferPointer<T>, recvCounts: [Int], recvOffsets: [Int]) throws {
        let stride = MemoryLayout<T>.stride
        try allToAllV(send: UnsafeRawBufferPointer(send), sendCounts: sendCounts.map { $0 * stride },
                      sendOffsets: sendOffsets.map { $0 * stride },
                      recv: UnsafeMutableRawBufferPointer(recv), recvCounts: recvCounts.map { $0 * stride },
                      recvOffsets: recvOffsets.map { $0 * stride })
    }
}

/// One process, no MPI: every collective is the identity (or a local copy).
public final class SingleRankCommunicator: Communicator {
    public init() {}
    public var rank: Int { 0 }
    public var size: Int { 1 }
    public func allReduce(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, op: ReduceOp) throws {}
    public func exclusiveScanSum(_ buffer: UnsafeMutableBufferPointer<Int64>) throws {
        for index in buffer.indices { buffer[index] = 0 }
    }
    public func allToAll(send: UnsafeBufferPointer<Int64>, recv: UnsafeMutableBufferPointer<Int64>, blockCount: Int) throws {
        precondition(send.count == blockCount && recv.count == blockCount)
        for index in 0..<blockCount { recv[index] = send[index] }
    }
    public func allToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                          recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int]) throws {
        guard sendCounts == recvCounts else {
            throw CommError.mismatch(operation: "all-to-all-v", rank: 0, detail: "sends \(sendCounts[0]) bytes to itself but expects \(recvCounts[0])")
        }
        guard sendCounts[0] > 0 else { return }
        let source = send.baseAddress! + sendOffsets[0]
        (recv.baseAddress! + recvOffsets[0]).copyMemory(from: source, byteCount: sendCounts[0])
    }
    public func reduceScatterSum(_ buffer: UnsafeMutableRawBufferPointer, blockCounts: [Int], type: CommDataType) throws {}
    public func allGather(_ buffer: UnsafeMutableRawBufferPointer, blockByteCounts: [Int]) throws {}
    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {}
    public func barrier() throws {}
    public func split(color: Int, key: Int) throws -> Communicator { SingleRankCommunicator() }
    public func abort(code: Int32) -> Never { exit(code) }
}

#if canImport(Glibc)
import Glibc
#endif
