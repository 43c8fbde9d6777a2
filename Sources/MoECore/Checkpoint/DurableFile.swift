import CDirectIO
import Foundation

/// Checkpoint files written and read past the page cache (`O_DIRECT`) where the file system
/// allows it, in chunks, with buffered I/O as the fallback (tmpfs, unaligned memory, the last
/// partial block).
///
/// Why: a buffered write of a fresh file makes the kernel allocate and fill page cache, which is
/// CPU work: on the development machine (a VM) 750 MB cost 1.9 s of system time buffered against
/// 0.1 s direct (the rest of a direct write, 0.4-0.6 s, is waiting for the device). A background
/// save can hide waiting, not CPU work that competes with the training ranks for their cores.
/// Reading back through a small aligned buffer likewise costs the digest and no page cache.
enum DurableFile {
    /// O_DIRECT's alignment of memory, sizes and offsets (the page size covers every device).
    static let alignment = 4096
    static let chunkBytes = 32 << 20
    private static let oDirect = swiftmoe_o_direct()

    /// Writes `bytes` to a new file at `path` (replacing one), calls `beforeSync`, fsyncs, then
    /// reads the file back and compares it with `bytes`: the record returned (size, SHA-256) is
    /// of what is on disk, checked equal to what was meant. One digest and one comparison per
    /// file, where hashing the memory and then the file again cost two digests.
    @discardableResult
    static func write(_ bytes: UnsafeRawBufferPointer, to path: String, beforeSync: () throws -> Void) throws -> CheckpointManifest.FileRecord {
        let aligned = Int(bitPattern: bytes.baseAddress) % alignment == 0
        var descriptor = aligned ? open(path, O_WRONLY | O_CREAT | O_TRUNC | oDirect | O_CLOEXEC, 0o644) : -1
        let direct = descriptor >= 0
        if !direct { descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        guard descriptor >= 0 else { throw failure(path, "cannot create it") }
        defer { close(descriptor) }
        // Direct: whole blocks (until a device refuses them); the rest buffered, O_DIRECT cleared.
        let reached = direct ? try writeAll(descriptor, bytes, range: 0..<(bytes.count / alignment * alignment), path: path, direct: true) : 0
        if direct && reached < bytes.count {
            guard fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) & ~oDirect) == 0 else { throw failure(path, "cannot finish it") }
        }
        _ = try writeAll(descriptor, bytes, range: reached..<bytes.count, path: path, direct: false)
        try beforeSync()
        guard fsync(descriptor) == 0 else { throw failure(path, "cannot sync it") }
        var compared = 0
        let record = try record(of: path) { chunk in
            guard compared + chunk.count <= bytes.count, memcmp(chunk.baseAddress!, bytes.baseAddress! + compared, chunk.count) == 0 else {
                throw CheckpointError.corrupt(path: path, reason: "reads back different from what was written (at byte \(compared) or after)")
            }
            compared += chunk.count
        }
        guard record.bytes == bytes.count else {
            throw CheckpointError.corrupt(path: path, reason: "reads back \(record.bytes) bytes of the \(bytes.count) written")
        }
        return record
    }

    /// Writes `range` of `bytes` at the same file offsets; returns where it stopped (`direct`: the
    /// first chunk the file system refuses unbuffered, EINVAL, is left to the buffered pass).
    private static func writeAll(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, range: Range<Int>, path: String,
                                 direct: Bool) throws -> Int {
        var offset = range.lowerBound
        while offset < range.upperBound {
            let count = min(chunkBytes, range.upperBound - offset)
            let written = pwrite(descriptor, bytes.baseAddress! + offset, count, off_t(offset))
            if written < 0 && errno == EINTR { continue }
            if written < 0 && errno == EINVAL && direct { return offset }
            guard written > 0 else { throw failure(path, "cannot write it") }
            offset += written
        }
        return offset
    }

    /// The file's size and SHA-256, read in chunks (directly where possible), each also handed
    /// to `inspect`.
    static func record(of path: String, inspect: (UnsafeRawBufferPointer) throws -> Void = { _ in }) throws -> CheckpointManifest.FileRecord {
        var descriptor = open(path, O_RDONLY | oDirect | O_CLOEXEC)
        if descriptor < 0 && errno == EINVAL { descriptor = open(path, O_RDONLY | O_CLOEXEC) }
        guard descriptor >= 0 else { throw CheckpointError.corrupt(path: path, reason: "missing or unreadable") }
        defer { close(descriptor) }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunkBytes, alignment: alignment)
        defer { buffer.deallocate() }
        var hasher = SHA256(), total = 0
        while true {
            let count = read(descriptor, buffer, chunkBytes)
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else { throw failure(path, "cannot read it") }
            if count == 0 { break }
            try inspect(UnsafeRawBufferPointer(start: buffer, count: count))
            hasher.update(UnsafeRawBufferPointer(start: buffer, count: count))
            total += count
        }
        return CheckpointManifest.FileRecord(bytes: total, sha256: hasher.finalizeHex())
    }

    private static func failure(_ path: String, _ what: String) -> CheckpointError {
        CheckpointError.corrupt(path: path, reason: "\(what): \(String(cString: strerror(errno)))")
    }
}
