import Foundation
import MoEComm

/// Several ranks as threads of one process, for testing distributed logic without `mpirun`.
///
/// Every collective stages each rank's input, meets at a barrier, lets every rank compute its
/// own result from the staged inputs (reductions always in rank order 0, 1, ..., so every rank
/// gets bit-identical results), and meets again before the staging area is reused. Like MPI,
/// `allToAllV` checks that what a rank expects from a source is what that source sends.
public final class ThreadedCommunicator: Communicator {
    public let rank: Int
    public var size: Int { group.size }
    let group: ThreadGroup

    init(group: ThreadGroup, rank: Int) {
        self.group = group
        self.rank = rank
    }

    /// Runs `body` on `size` threads, one rank each, and returns when all have finished.
    /// Rethrows the error of the lowest failing rank.
    public static func run(size: Int, stackSize: Int = 16 << 20, _ body: @escaping @Sendable (ThreadedCommunicator) throws -> Void) throws {
        let group = ThreadGroup(size: size)
        let finished = DispatchGroup()
        let errors = ErrorSlots(count: size)
        for rank in 0..<size {
            finished.enter()
            let thread = Thread {
                let communicator = ThreadedCommunicator(group: group, rank: rank)
                do { try body(communicator) } catch {
                    errors.set(rank, error)
                    group.abort()   // unblock the others instead of leaving them in a barrier
                }
                finished.leave()
            }
            thread.stackSize = stackSize
            thread.start()
        }
        finished.wait()
        if let (_, error) = errors.first { throw error }
    }

    private func stage(_ bytes: UnsafeRawBufferPointer, extra: [Int] = []) {
        group.slots[rank].bytes = Array(bytes)
        group.slots[rank].counts = extra
    }

    public func allReduce(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, op: ReduceOp) throws {
        stage(UnsafeRawBufferPointer(buffer), extra: [buffer.count])
        try group.barrier(rank)
        for source in 0..<size where group.slots[source].counts != [buffer.count] {
            throw CommError.mismatch(operation: "all-reduce", rank: rank, detail: "rank \(source) reduces \(group.slots[source].counts) bytes, this rank \(buffer.count)")
        }
        switch type {
        case .float32: reduce(buffer, as: Float.self, op: op)
        case .float64: reduce(buffer, as: Double.self, op: op)
        case .int64: reduce(buffer, as: Int64.self, op: op)
        }
        try group.barrier(rank)
    }

    private func reduce<T: Comparable & AdditiveArithmetic>(_ buffer: UnsafeMutableRawBufferPointer, as: T.Type, op: ReduceOp) {
        let output = buffer.bindMemory(to: T.self)
        for index in output.indices {
            var value = group.slots[0].bytes.withUnsafeBytes { $0.load(fromByteOffset: index * MemoryLayout<T>.stride, as: T.self) }
            for source in 1..<size {
                let next = group.slots[source].bytes.withUnsafeBytes { $0.load(fromByteOffset: index * MemoryLayout<T>.stride, as: T.self) }
                switch op {
                case .sum: value = value + next
                case .max: value = max(value, next)
                case .min: value = min(value, next)
                }
            }
            output[index] = value
        }
    }

    public func exclusiveScanSum(_ buffer: UnsafeMutableBufferPointer<Int64>) throws {
        stage(UnsafeRawBufferPointer(buffer))
        try group.barrier(rank)
        for index in buffer.indices {
            var sum: Int64 = 0
            for source in 0..<rank {
                sum += group.slots[source].bytes.withUnsafeBytes { $0.load(fromByteOffset: index * 8, as: Int64.self) }
            }
            buffer[index] = sum
        }
        try group.barrier(rank)
    }

    public func allToAll(send: UnsafeBufferPointer<Int64>, recv: UnsafeMutableBufferPointer<Int64>, blockCount: Int) throws {
        precondition(send.count == blockCount * size && recv.count == blockCount * size)
        stage(UnsafeRawBufferPointer(send))
        try group.barrier(rank)
        for source in 0..<size {
            for index in 0..<blockCount {
                recv[source * blockCount + index] = group.slots[source].bytes.withUnsafeBytes {
                    $0.load(fromByteOffset: (rank * blockCount + index) * 8, as: Int64.self)
                }
            }
        }
        try group.barrier(rank)
    }

    public func allToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                          recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int]) throws {
        group.slots[rank].bytes = Array(send)
        group.slots[rank].counts = sendCounts + sendOffsets
        try group.barrier(rank)
        var failure: Error?
        for source in 0..<size {
            let count = group.slots[source].counts[rank], offset = group.slots[source].counts[size + rank]
            guard count == recvCounts[source] else {
                failure = CommError.mismatch(operation: "all-to-all-v", rank: rank,
                                             detail: "rank \(source) sends \(count) bytes, this rank expects \(recvCounts[source])")
                break
            }
            if count > 0 {
                group.slots[source].bytes.withUnsafeBytes { staged in
                    (recv.baseAddress! + recvOffsets[source]).copyMemory(from: staged.baseAddress! + offset, byteCount: count)
                }
            }
        }
        try group.barrier(rank)
        if let failure { throw failure }
    }

    /// The whole sum, in rank order like `allReduce` (a superset of this rank's block).
    public func reduceScatterSum(_ buffer: UnsafeMutableRawBufferPointer, blockCounts: [Int], type: CommDataType) throws {
        precondition(blockCounts.count == size && blockCounts.reduce(0, +) * type.byteCount == buffer.count)
        try allReduce(buffer, type: type, op: .sum)
    }

    public func allGather(_ buffer: UnsafeMutableRawBufferPointer, blockByteCounts: [Int]) throws {
        precondition(blockByteCounts.count == size && blockByteCounts.reduce(0, +) == buffer.count)
        let offsets = blockByteCounts.indices.map { blockByteCounts[..<$0].reduce(0, +) }
        stage(UnsafeRawBufferPointer(rebasing: buffer[offsets[rank]..<offsets[rank] + blockByteCounts[rank]]))
        try group.barrier(rank)
        for source in 0..<size where source != rank && blockByteCounts[source] > 0 {
            group.slots[source].bytes.withUnsafeBytes { (buffer.baseAddress! + offsets[source]).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        }
        try group.barrier(rank)
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        if rank == root { stage(UnsafeRawBufferPointer(buffer)) }
        try group.barrier(rank)
        if rank != root { group.slots[root].bytes.withUnsafeBytes { buffer.copyMemory(from: $0) } }
        try group.barrier(rank)
    }

    public func barrier() throws { try group.barrier(rank) }

    public func split(color: Int, key: Int) throws -> Communicator {
        group.slots[rank].counts = [color, key]
        try group.barrier(rank)
        let members = (0..<size).filter { group.slots[$0].counts[0] == color }
            .sorted { (group.slots[$0].counts[1], $0) < (group.slots[$1].counts[1], $1) }
        // The lowest old rank of each color creates the child group; everyone picks theirs up.
        if members.min() == rank { group.adopt(ThreadGroup(size: members.count), color: color) }
        try group.barrier(rank)
        return ThreadedCommunicator(group: group.child(color: color), rank: members.firstIndex(of: rank)!)
    }

    /// Marks the group aborted (every rank's next collective throws) and ends this thread.
    public func abort(code: Int32) -> Never {
        group.abort()
        Thread.exit()
        fatalError("unreachable")
    }
}

/// One rank's staging area: what it contributes to the collective in progress. Each rank writes
/// only its own slot (the slots are separate objects, so no two threads mutate one array) and
/// reads the others' after a barrier.
final class StagingSlot: @unchecked Sendable {
    var bytes: [UInt8] = []
    var counts: [Int] = []
}

/// Shared state of one group of thread-ranks. Access to the slots and `children` is ordered by
/// the barriers (the condition's lock publishes the writes).
final class ThreadGroup: @unchecked Sendable {
    let size: Int
    let slots: [StagingSlot]
    /// Groups made by `split`, by color (the latest split's); all of them are aborted with this one.
    private var children: [Int: ThreadGroup] = [:]
    private var descendants: [ThreadGroup] = []
    private let condition = NSCondition()
    private var arrived = 0
    private var generation = 0
    private var aborted = false

    init(size: Int) {
        self.size = size
        slots = (0..<size).map { _ in StagingSlot() }
    }

    func barrier(_ rank: Int) throws {
        condition.lock()
        defer { condition.unlock() }
        guard !aborted else { throw CommError.aborted(rank: rank) }
        let entered = generation
        arrived += 1
        if arrived == size {
            arrived = 0
            generation += 1
            condition.broadcast()
        } else {
            while generation == entered && !aborted { condition.wait() }
            if aborted { throw CommError.aborted(rank: rank) }
        }
    }

    func adopt(_ child: ThreadGroup, color: Int) {
        condition.lock()
        children[color] = child
        descendants.append(child)
        condition.unlock()
    }

    func child(color: Int) -> ThreadGroup {
        condition.lock()
        defer { condition.unlock() }
        return children[color]!
    }

    func abort() {
        condition.lock()
        aborted = true
        condition.broadcast()
        let descendants = self.descendants
        condition.unlock()
        for child in descendants { child.abort() }
    }
}

private final class ErrorSlots: @unchecked Sendable {
    private var errors: [Error?]
    private let lock = NSLock()
    init(count: Int) { errors = Array(repeating: nil, count: count) }
    func set(_ rank: Int, _ error: Error) { lock.lock(); errors[rank] = error; lock.unlock() }
    var first: (Int, Error)? {
        lock.lock(); defer { lock.unlock() }
        // Prefer a rank's own failure over the "aborted by another rank" errors it caused.
        let real = errors.enumerated().first { if let error = $0.element, case CommError.aborted = error { return false } else { return $0.element != nil } }
        return (real ?? errors.enumerated().first { $0.element != nil }).map { ($0.offset, $0.element!) }
    }
}
