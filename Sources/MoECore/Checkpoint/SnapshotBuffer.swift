import Foundation

/// Memory a save encodes the state into before writing it. An asynchronous save
/// (`checkpoint.async`) keeps it from one save to the next; a blocking save releases it.
///
/// Why its own memory: the snapshot is the part of a background save the steps wait for, and
/// fresh memory costs a page fault per 4 KiB page on first touch, several times the copy itself
/// (about 1.5 s for 0.85 GB on the development VM). So the buffer is mapped with transparent huge
/// pages requested (a fault per 2 MiB) and kept: the next snapshot is a plain copy into mapped
/// memory. The price is resident memory: with `checkpoint.async` one more copy of this rank's
/// encoded parameters and moments (rank 0: and the replicated ones) for the whole run, where a
/// blocking save holds it only while it writes. The mapping is page aligned, as the direct
/// writes of `DurableFile` need.
final class SnapshotBuffer {
    private var start: UnsafeMutableRawPointer?
    private var capacity = 0
    private static let hugePage = 2 << 20

    deinit { if let start { munmap(start, capacity) } }

    /// `bytes` of this buffer's memory (mapped anew if it is too small; contents not kept).
    func region(bytes: Int) throws -> UnsafeMutableRawBufferPointer {
        if bytes > capacity {
            if let start { munmap(start, capacity) }
            start = nil
            capacity = 0
            let size = (max(bytes, 1) + SnapshotBuffer.hugePage - 1) / SnapshotBuffer.hugePage * SnapshotBuffer.hugePage
            guard let mapped = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mapped != MAP_FAILED else {
                throw CheckpointError.snapshotFailed(reason: "cannot map \(size >> 20) MiB for the snapshot: \(String(cString: strerror(errno)))")
            }
            _ = madvise(mapped, size, MADV_HUGEPAGE)   // a hint: without it, 4 KiB pages
            (start, capacity) = (mapped, size)
        }
        return UnsafeMutableRawBufferPointer(start: start, count: bytes)
    }
}

/// The buffers of one rank's snapshots: its expert shard and (rank 0) the replicated file.
public final class CheckpointSnapshot {
    let shard = SnapshotBuffer(), replicated = SnapshotBuffer()
    public init() {}
}
