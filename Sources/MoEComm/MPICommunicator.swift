import CMPI
#if canImport(Glibc)
import Glibc
#endif

/// OpenMPI-backed communicator over MPI_COMM_WORLD.
///
/// `MPI_Init` may run only once per process, so there is at most one instance; create it with
/// `MPICommunicator.initialize()` and call `finalize()` before a normal exit. Errors are returned
/// (MPI_ERRORS_RETURN) and thrown as `CommError` naming the rank and the operation.
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int
    private let world: MPI_Comm?

    /// True when this process was started by `mpirun` (OpenMPI sets these variables).
    public static var launchedByMPI: Bool {
        getenv("OMPI_COMM_WORLD_SIZE") != nil || getenv("PMIX_RANK") != nil
    }

    public static func initialize() throws -> MPICommunicator {
        var argc: Int32 = 0
        var provided: Int32 = 0
        let code = MPI_Init_thread(&argc, nil, Int32(MPI_THREAD_FUNNELED), &provided)
        guard code == swiftmoe_success() else {
            throw CommError.mpi(operation: "MPI_Init", rank: -1, code: code, message: "cannot start MPI")
        }
        let world = swiftmoe_comm_world()
        var rank: Int32 = 0, size: Int32 = 0
        for (code, operation) in [(MPI_Comm_set_errhandler(world, swiftmoe_errors_return()), "MPI_Comm_set_errhandler"),
                                  (MPI_Comm_rank(world, &rank), "MPI_Comm_rank"), (MPI_Comm_size(world, &size), "MPI_Comm_size")]
        where code != swiftmoe_success() {
            throw CommError.mpi(operation: operation, rank: Int(rank), code: code, message: "cannot set up MPI_COMM_WORLD")
        }
        return MPICommunicator(world: world, rank: Int(rank), size: Int(size))
    }

    private init(world: MPI_Comm?, rank: Int, size: Int) {
        self.world = world
        self.rank = rank
        self.size = size
    }

    public func finalize() { MPI_Finalize() }

    private func check(_ code: Int32, _ operation: String) throws {
        guard code != swiftmoe_success() else { return }
        var length: Int32 = 0
        var text = [CChar](repeating: 0, count: Int(MPI_MAX_ERROR_STRING) + 1)
        MPI_Error_string(code, &text, &length)
        throw CommError.mpi(operation: operation, rank: rank, code: code, message: String(cString: text))
    }

    private func datatype(_ type: CommDataType) -> MPI_Datatype? {
        switch type {
        case .float32: return swiftmoe_float()
        case .float64: return swiftmoe_double()
        case .int64: return swiftmoe_int64()
        }
    }

    private func mpiOp(_ op: ReduceOp) -> MPI_Op? {
        switch op {
        case .sum: return swiftmoe_op_sum()
        case .max: return swiftmoe_op_max()
        case .min: return swiftmoe_op_min()
        }
    }

    private func int32Count(_ value: Int, _ operation: String) throws -> Int32 {
        guard let count = Int32(exactly: value) else {
            throw CommError.mismatch(operation: operation, rank: rank, detail: "count \(value) exceeds MPI's 32-bit limit")
        }
        return count
    }

    public func allReduce(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, op: ReduceOp) throws {
        let count = try int32Count(buffer.count / type.byteCount, "MPI_Allreduce")
        guard count > 0 else { return }
        try check(MPI_Allreduce(swiftmoe_in_place(), buffer.baseAddress, count, datatype(type), mpiOp(op), world),
                  "MPI_Allreduce")
    }

    public func exclusiveScanSum(_ buffer: UnsafeMutableBufferPointer<Int64>) throws {
        let count = try int32Count(buffer.count, "MPI_Exscan")
        guard count > 0 else { return }
        let input = Array(buffer)
        try input.withUnsafeBufferPointer { source in
            try check(MPI_Exscan(source.baseAddress, buffer.baseAddress, count, swiftmoe_int64(), swiftmoe_op_sum(), world),
                      "MPI_Exscan")
        }
        // MPI leaves rank 0's receive buffer undefined.
        if rank == 0 { for index in buffer.indices { buffer[index] = 0 } }
    }

    public func allToAll(send: UnsafeBufferPointer<Int64>, recv: UnsafeMutableBufferPointer<Int64>, blockCount: Int) throws {
        precondition(send.count == blockCount * size && recv.count == blockCount * size)
        let count = try int32Count(blockCount, "MPI_Alltoall")
        try check(MPI_Alltoall(send.baseAddress, count, swiftmoe_int64(), recv.baseAddress, count, swiftmoe_int64(), world),
                  "MPI_Alltoall")
    }

    public func allToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                          recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int]) throws {
        let operation = "MPI_Alltoallv"
        let sc = try sendCounts.map { try int32Count($0, operation) }
        let so = try sendOffsets.map { try int32Count($0, operation) }
        let rc = try recvCounts.map { try int32Count($0, operation) }
        let ro = try recvOffsets.map { try int32Count($0, operation) }
        try check(MPI_Alltoallv(send.baseAddress, sc, so, swiftmoe_byte(), recv.baseAddress, rc, ro, swiftmoe_byte(), world),
                  operation)
    }

    /// MPI_Reduce_scatter in place leaves this rank's sums at the start of the buffer; they are
    /// moved to the rank's own block.
    public func reduceScatterSum(_ buffer: UnsafeMutableRawBufferPointer, blockCounts: [Int], type: CommDataType) throws {
        let operation = "MPI_Reduce_scatter"
        let counts = try blockCounts.map { try int32Count($0, operation) }
        guard blockCounts.reduce(0, +) > 0 else { return }
        try check(MPI_Reduce_scatter(swiftmoe_in_place(), buffer.baseAddress, counts, datatype(type), swiftmoe_op_sum(), world),
                  operation)
        let offset = blockCounts[..<rank].reduce(0, +) * type.byteCount
        if offset > 0 { memmove(buffer.baseAddress! + offset, buffer.baseAddress!, blockCounts[rank] * type.byteCount) }
    }

    public func allGather(_ buffer: UnsafeMutableRawBufferPointer, blockByteCounts: [Int]) throws {
        let operation = "MPI_Allgatherv"
        let counts = try blockByteCounts.map { try int32Count($0, operation) }
        let offsets = try blockByteCounts.indices.map { try int32Count(blockByteCounts[..<$0].reduce(0, +), operation) }
        guard buffer.count > 0 else { return }
        try check(MPI_Allgatherv(swiftmoe_in_place(), 0, swiftmoe_byte(), buffer.baseAddress, counts, offsets, swiftmoe_byte(), world),
                  operation)
    }

    public func broadcast(_ buffer: UnsafeMutableRawBufferPointer, root: Int) throws {
        let count = try int32Count(buffer.count, "MPI_Bcast")
        guard count > 0 else { return }
        try check(MPI_Bcast(buffer.baseAddress, count, swiftmoe_byte(), Int32(root), world), "MPI_Bcast")
    }

    public func barrier() throws { try check(MPI_Barrier(world), "MPI_Barrier") }

    public func startAllReduceSum(_ buffer: UnsafeMutableRawBufferPointer, type: CommDataType, in transfer: PendingTransfer) throws {
        precondition(transfer.isComplete, "a transfer is restarted before it finished")
        let count = try int32Count(buffer.count / type.byteCount, "MPI_Iallreduce")
        guard count > 0 else { return }
        var request = swiftmoe_request_null()
        try check(MPI_Iallreduce(swiftmoe_in_place(), buffer.baseAddress, count, datatype(type), swiftmoe_op_sum(), world, &request),
                  "MPI_Iallreduce")
        transfer.handle = request
    }

    public func startAllToAllV(send: UnsafeRawBufferPointer, sendCounts: [Int], sendOffsets: [Int],
                               recv: UnsafeMutableRawBufferPointer, recvCounts: [Int], recvOffsets: [Int], in transfer: PendingTransfer) throws {
        let operation = "MPI_Ialltoallv", ranks = sendCounts.count
        // MPI reads the four count arrays until the transfer completes: the transfer keeps them.
        let arrays = transfer.retainedStorage(count: 4 * ranks)
        for peer in 0..<ranks {
            arrays[peer] = try int32Count(sendCounts[peer], operation)
            arrays[ranks + peer] = try int32Count(sendOffsets[peer], operation)
            arrays[2 * ranks + peer] = try int32Count(recvCounts[peer], operation)
            arrays[3 * ranks + peer] = try int32Count(recvOffsets[peer], operation)
        }
        let base = arrays.baseAddress!
        var request = swiftmoe_request_null()
        try check(MPI_Ialltoallv(send.baseAddress, base, base + ranks, swiftmoe_byte(), recv.baseAddress, base + 2 * ranks,
                                 base + 3 * ranks, swiftmoe_byte(), world, &request), operation)
        transfer.handle = request
    }

    public func progress(_ transfer: PendingTransfer) throws {
        guard !transfer.isComplete else { return }
        var request: MPI_Request? = transfer.handle
        var done: Int32 = 0
        try check(MPI_Test(&request, &done, swiftmoe_status_ignore()), "MPI_Test")
        if done != 0 { transfer.handle = nil }
    }

    public func finish(_ transfer: PendingTransfer) throws {
        guard !transfer.isComplete else { return }
        var request: MPI_Request? = transfer.handle
        try check(MPI_Wait(&request, swiftmoe_status_ignore()), "MPI_Wait")
        transfer.handle = nil
    }

    public func split(color: Int, key: Int) throws -> Communicator {
        var child: MPI_Comm?
        try check(MPI_Comm_split(world, Int32(color), Int32(key), &child), "MPI_Comm_split")
        try check(MPI_Comm_set_errhandler(child, swiftmoe_errors_return()), "MPI_Comm_set_errhandler")
        var childRank: Int32 = 0, childSize: Int32 = 0
        try check(MPI_Comm_rank(child, &childRank), "MPI_Comm_rank")
        try check(MPI_Comm_size(child, &childSize), "MPI_Comm_size")
        return MPICommunicator(world: child, rank: Int(childRank), size: Int(childSize))
    }

    public func abort(code: Int32) -> Never {
        MPI_Abort(world, code)
        exit(code)
    }
}
