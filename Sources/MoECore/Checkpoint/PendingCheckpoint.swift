import Foundation
import MoEComm

/// A checkpoint save in progress (`Checkpoint.begin`): this rank's files are written from the
/// snapshot, on a background thread for an asynchronous save; `complete` finishes it on every
/// rank together: each writer's size and digest reach rank 0, which checks the shards on disk,
/// writes the manifest, then DONE, then prunes (in the background too for an asynchronous save,
/// so the steps wait for neither). Until DONE the directory is not a checkpoint, so a crash at
/// any point leaves the previous checkpoints as they were.
public final class PendingCheckpoint {
    public let directory: String
    let runDirectory: String
    let keep: Int
    /// The manifest of the snapshot, its file lists filled in at completion.
    var manifest: CheckpointManifest
    let hooks: TrainingHooks?
    /// The memory the files are encoded in (their Data does not own it): held until the save is done.
    let snapshot: CheckpointSnapshot
    /// When the save began (for the log).
    public let started = DispatchTime.now()
    private let writes = DispatchGroup()
    /// Set by the writer before it leaves `writes`; read after `writes` is done.
    private var shardRecord: CheckpointManifest.FileRecord?
    private var files: [String: CheckpointManifest.FileRecord] = [:]
    private var failure: Error?
    /// Rank 0's finish: started once every rank's writes are done; its error, read after `finished`.
    private var finishing = false
    private let finished = DispatchGroup()
    private var finishFailure: Error?

    init(directory: String, runDirectory: String, keep: Int, manifest: CheckpointManifest, hooks: TrainingHooks?,
         snapshot: CheckpointSnapshot) {
        self.snapshot = snapshot
        self.directory = directory
        self.runDirectory = runDirectory
        self.keep = keep
        self.manifest = manifest
        self.hooks = hooks
    }

    /// Writes this rank's expert shard and (rank 0) the other files, durably.
    func write(shard: (name: String, data: Data)?, files contents: [String: Data], inBackground: Bool) {
        writes.enter()
        let step = manifest.step, directory = self.directory, hooks = self.hooks
        let work = { [self] in
            do {
                if let shard {
                    shardRecord = try Checkpoint.writeDurably(shard.data, to: (directory as NSString).appendingPathComponent(shard.name),
                                                              beforeRename: { try hooks?.reached(.writingShard, step: step) })
                }
                for (name, data) in contents.sorted(by: { $0.key < $1.key }) {
                    files[name] = try Checkpoint.writeDurably(data, to: (directory as NSString).appendingPathComponent(name))
                }
            } catch {
                failure = error
            }
            writes.leave()
        }
        if inBackground { DispatchQueue.global(qos: .utility).async(execute: work) } else { work() }
    }

    /// Collective. With `wait`, waits for the save and finishes it; without, moves it on as far
    /// as it can without waiting and returns nil until it is done (call again at a later step).
    /// Two phases: every rank's writes, then rank 0's finish (it checks the shards' sizes on
    /// disk, writes the manifest and DONE, prunes), itself on a background thread for an
    /// asynchronous save. Returns the checkpoint directory once DONE is written.
    public func complete(communicator: Communicator, wait: Bool) throws -> String? {
        if !finishing {
            guard try writesAreDone(communicator: communicator, wait: wait) else { return nil }
            try startFinish(communicator: communicator, inBackground: !wait)
        }
        if communicator.rank == 0 && wait { finished.wait() }
        let done: Int64 = communicator.rank != 0 || finished.wait(timeout: .now()) == .success ? 1 : 0
        guard try communicator.allReduce(done, op: .min) == 1 else { return nil }
        try communicator.agree { if let finishFailure { throw finishFailure } }
        return directory
    }

    /// Whether every rank's writes are done (a failed write is an error on every rank).
    private func writesAreDone(communicator: Communicator, wait: Bool) throws -> Bool {
        if wait {
            writes.wait()
        } else {
            let done: Int64 = writes.wait(timeout: .now()) == .success ? 1 : 0
            guard try communicator.allReduce(done, op: .min) == 1 else { return false }
        }
        try communicator.agree { if let failure { throw failure } }
        return true
    }

    /// Every writer's size and digest reach rank 0, which starts the finish.
    private func startFinish(communicator: Communicator, inBackground: Bool) throws {
        // [present, bytes, 4 x 64-bit digest words] per rank, through one all-reduce.
        let rank = communicator.rank, ranks = communicator.size
        var reports = [Int64](repeating: 0, count: ranks * 6)
        if let shardRecord {
            reports[rank * 6] = 1
            reports[rank * 6 + 1] = Int64(shardRecord.bytes)
            for word in 0..<4 { reports[rank * 6 + 2 + word] = Checkpoint.digestWord(shardRecord.sha256, word) }
        }
        try communicator.allReduce(&reports)
        finishing = true
        guard rank == 0 else { return }
        finished.enter()
        let work = { [self] in
            do {
                var files = self.files
                manifest.expertFiles = try Checkpoint.verifyExpertShards(reports, directory: directory, ranks: ranks, files: &files)
                manifest.files = files
                try finish()
            } catch {
                finishFailure = error
            }
            finished.leave()
        }
        if inBackground { DispatchQueue.global(qos: .utility).async(execute: work) } else { work() }
    }

    /// Rank 0: the manifest, DONE (holding the manifest's digest), pruning.
    private func finish() throws {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let step = manifest.step
        let written = try Checkpoint.writeDurably(try encoder.encode(manifest),
                                                  to: (directory as NSString).appendingPathComponent(Checkpoint.manifestFile))
        try hooks?.reached(.manifestWritten, step: step)
        _ = try Checkpoint.writeDurably(Data("step \(step)\nmanifest_sha256 \(written.sha256)\n".utf8),
                                        to: (directory as NSString).appendingPathComponent(Checkpoint.doneFile))
        Checkpoint.syncDirectory(directory)
        try Checkpoint.prune(runDirectory: runDirectory, keep: keep, midway: { try self.hooks?.reached(.pruning, step: step) })
    }
}
