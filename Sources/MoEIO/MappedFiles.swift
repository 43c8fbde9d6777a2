#if canImport(Glibc)
import Glibc
#endif

/// Token files are memory-mapped; a file truncated while a run reads it makes the next read of
/// a page past its new end raise SIGBUS, which would end the process with a crash report. The
/// mapped ranges are registered here, and a SIGBUS handler turns a fault inside one of them into
/// a one-line error naming the file and exit status 74 (EX_IOERR); mpirun then ends the job. A
/// fault anywhere else goes on to the handler that was installed before (Swift's backtracer).
///
/// The table is fixed storage written before a mapping is used and read by the handler, which
/// allocates nothing and calls only async-signal-safe functions (write, _exit, sigaction).
enum MappedFiles {
    static let capacity = 1024
    /// [capacity] start and end addresses (0, 0: a free slot) and each file's message.
    static let ranges = UnsafeMutablePointer<(start: UInt, end: UInt)>.allocate(capacity: capacity)
    static let messages = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: capacity)
    static var previous = sigaction()
    static let installed: Bool = {
        ranges.initialize(repeating: (0, 0), count: capacity)
        messages.initialize(repeating: nil, count: capacity)
        var action = sigaction()
        action.__sigaction_handler.sa_sigaction = { _, info, _ in MappedFiles.handle(info) }
        action.sa_flags = SA_SIGINFO
        sigemptyset(&action.sa_mask)
        return sigaction(SIGBUS, &action, &previous) == 0
    }()

    /// Registers `bytes` at `base` as the mapping of `path`; returns its slot (nil when full: the
    /// mapping is then unguarded, as before).
    static func register(base: UnsafeMutableRawPointer, bytes: Int, path: String) -> Int? {
        guard installed, let slot = (0..<capacity).first(where: { ranges[$0].start == 0 }) else { return nil }
        messages[slot] = strdup("error: token file '\(path)' was truncated or replaced while the run read it; restore it and resume\n")
        let start = UInt(bitPattern: base)
        ranges[slot] = (start, start + UInt(bytes))
        return slot
    }

    static func unregister(_ slot: Int) {
        ranges[slot] = (0, 0)
        free(messages[slot])
        messages[slot] = nil
    }

    static func handle(_ info: UnsafeMutablePointer<siginfo_t>?) {
        let address = UInt(bitPattern: info?.pointee._sifields._sigfault.si_addr)
        for slot in 0..<capacity where ranges[slot].start <= address && address < ranges[slot].end {
            if let message = messages[slot] { _ = write(2, message, strlen(message)) }
            _exit(74)
        }
        // Not ours: the previous handler takes the fault when the instruction runs again.
        sigaction(SIGBUS, &previous, nil)
    }
}
