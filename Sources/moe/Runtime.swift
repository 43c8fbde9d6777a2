import Foundation
import MoEComm
import MoECore

/// Process-wide setup shared by the subcommands: the communicator (MPI when started by mpirun,
/// otherwise a single rank), BLAS threads, and the error policy.
enum Runtime {
    /// Runs `body` with a communicator. Any error is printed as one line naming the rank and the
    /// process exits non-zero; with several ranks it aborts the whole MPI job, since the other
    /// ranks may be waiting in a collective for this one.
    static func run(_ body: (Communicator) throws -> Void) -> Never {
        var mpi: MPICommunicator?
        let communicator: Communicator
        do {
            if MPICommunicator.launchedByMPI {
                let world = try MPICommunicator.initialize()
                mpi = world
                communicator = world
            } else {
                communicator = SingleRankCommunicator()
            }
        } catch {
            fail("\(error)", rank: nil, communicator: nil)
        }
        // One thread per rank for each matrix library when several ranks share the machine, the
        // cores to oneDNN in one process (BLASInfo.shareCoresInOneProcess), unless the user chose
        // with that library's variable.
        if communicator.size > 1 {
            if getenv("OPENBLAS_NUM_THREADS") == nil { BLASInfo.setBLASThreads(1) }
            if getenv("OMP_NUM_THREADS") == nil { BLASInfo.setOneDNNThreads(1) }
        } else {
            BLASInfo.shareCoresInOneProcess()
        }
        do {
            try body(communicator)
        } catch {
            // Every rank raised it together: end cleanly. Otherwise other ranks may be waiting in
            // a collective for this one, so the whole job is aborted.
            if error is AgreedFailure {
                report("\(error)", communicator: communicator)
                mpi?.finalize()
                exit(1)
            }
            fail("\(error)", rank: communicator.rank, communicator: communicator)
        }
        mpi?.finalize()
        exit(0)
    }

    static func report(_ message: String, communicator: Communicator?) {
        let prefix = (communicator?.size ?? 1) > 1 ? "error (rank \(communicator!.rank)): " : "error: "
        FileHandle.standardError.write(Data((prefix + message.replacingOccurrences(of: "\n", with: " ") + "\n").utf8))
    }

    static func fail(_ message: String, rank: Int?, communicator: Communicator?) -> Never {
        report(message, communicator: communicator)
        if let communicator, communicator.size > 1 { communicator.abort(code: 1) }
        exit(1)
    }

    /// Set by SIGTERM/SIGINT (what Slurm sends before a time limit or preemption); the training
    /// loop checks it after every step. A raw pointer keeps the handler free of Swift runtime calls.
    static let terminationFlag: UnsafeMutablePointer<sig_atomic_t> = {
        let flag = UnsafeMutablePointer<sig_atomic_t>.allocate(capacity: 1)
        flag.initialize(to: 0)
        return flag
    }()

    static func installTerminationHandler() {
        _ = terminationFlag
        signal(SIGTERM) { _ in Runtime.terminationFlag.pointee = 1 }
        signal(SIGINT) { _ in Runtime.terminationFlag.pointee = 1 }
    }

    /// Prints on rank 0 only, flushed at once (progress lines must appear under mpirun too).
    static func logger(_ communicator: Communicator) -> (String) -> Void {
        { line in
            guard communicator.rank == 0 else { return }
            print(line)
            fflush(stdout)
        }
    }

    /// A line on rank 0's stderr (where `moe bench` keeps its stdout for the JSON line).
    static func note(_ line: String, communicator: Communicator) {
        guard communicator.rank == 0 else { return }
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// Start-up facts every run and benchmark should show (see the OPENBLAS_CORETYPE trap).
    static func announceEnvironment(_ log: (String) -> Void) {
        var line = "OpenBLAS core \(BLASInfo.coreName), \(BLASInfo.threads) thread(s) per rank; oneDNN \(BFloat16Support.current.isa), "
            + "\(BLASInfo.oneDNNThreads) thread(s) per rank"
            + (BLASInfo.pinnedOneDNNThreads > 0 ? " pinned one per core" : "")
        if let forced = getenv("OPENBLAS_CORETYPE") {
            line += "; warning: OPENBLAS_CORETYPE=\(String(cString: forced)) is set and overrides CPU detection (unset it for full speed)"
        }
        log(line)
        if let warning = BLASInfo.genericCoreWarning() { log(warning) }
    }
}
