#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// What this rank is doing now, for the stall watchdog: the training loop names each operation
/// as it starts it.
public final class Heartbeat: @unchecked Sendable {
    private let lock = NSLock()
    private var operation = "start-up"
    private var step = 0
    private var since = Clock.nanoseconds()
    private var stepDurations: [Double] = []

    public init() {}

    public func beat(_ operation: String, step: Int) {
        lock.lock()
        self.operation = operation
        self.step = step
        since = Clock.nanoseconds()
        lock.unlock()
    }

    /// Records a finished step's duration (the watchdog's sense of "normal").
    public func finishedStep(seconds: Double) {
        lock.lock()
        stepDurations.append(seconds)
        if stepDurations.count > 50 { stepDurations.removeFirst() }
        lock.unlock()
    }

    var snapshot: (operation: String, step: Int, seconds: Double, medianStep: Double) {
        lock.lock()
        defer { lock.unlock() }
        let sorted = stepDurations.sorted()
        return (operation, step, Double(Clock.nanoseconds() - since) * 1e-9, sorted.isEmpty ? 0 : sorted[sorted.count / 2])
    }
}

/// A thread that ends the process when the current operation has lasted longer than
/// max(minimum, factor × median step time): a hung collective, a stuck node or a deadlock then
/// ends the job with a message naming the rank and the operation, instead of hanging it. The
/// process exits (status 3) rather than calling MPI from this thread; mpirun then ends every rank.
public final class StallWatchdog {
    let heartbeat: Heartbeat
    let rank: Int
    let minimumSeconds: Double
    let factor: Double
    private var thread: Thread?

    public init(heartbeat: Heartbeat, rank: Int, minimumSeconds: Double, factor: Double) {
        self.heartbeat = heartbeat
        self.rank = rank
        self.minimumSeconds = minimumSeconds
        self.factor = factor
    }

    public func start() {
        let heartbeat = self.heartbeat, rank = self.rank, minimum = minimumSeconds, factor = self.factor
        let thread = Thread {
            while true {
                Thread.sleep(forTimeInterval: min(1, minimum / 4))
                let now = heartbeat.snapshot
                let limit = max(minimum, factor * now.medianStep)
                guard now.seconds > limit else { continue }
                let message = String(format: "error (rank %d): stalled for %.0f s in %@ at step %d (limit %.0f s: %.0f x the median step time of %.3f s, at least train.stall_seconds); aborting the job\n",
                                     rank, now.seconds, now.operation, now.step, limit, factor, now.medianStep)
                FileHandle.standardError.write(Data(message.utf8))
                _exit(3)
            }
        }
        thread.stackSize = 1 << 20
        thread.start()
        self.thread = thread
    }
}
