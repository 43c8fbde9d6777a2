import Foundation
import MoEComm
import MoEIO

/// `manifest.json` of a checkpoint directory (docs/ARCHITECTURE.md, "Checkpoints").
public struct CheckpointManifest: Codable, Equatable {
    public struct FileRecord: Codable, Equatable {
        public var bytes: Int
        public var sha256: String
    }

    public static let currentFormat = "swiftmoe-checkpoint"
    public static let currentVersion = 1

    public var format = CheckpointManifest.currentFormat
    public var version = CheckpointManifest.currentVersion
    /// Updates applied; training resumes at this step (the data cursor: batches are a function
    /// of seed and step, so the step is the whole cursor).
    public var step: Int
    public var tokensSeen: Int
    public var worldSize: Int
    public var vocabularySize: Int
    /// For every global expert id, the rank that hosted it when saving.
    public var expertRanks: [Int]
    /// Expert shard file of each saving rank (index = rank; nil for ranks holding replicas only).
    public var expertFiles: [String?]
    public var learningRate: Double
    public var optimizerSteps: [String: Int]
    /// Counter-based random streams are keyed by (seed, step, ...): this seed plus `step` is every
    /// rank's full RNG state.
    public var seed: Int
    /// The full resolved config (YAML).
    public var config: String
    public var files: [String: FileRecord]
    /// Schedule positions at `step` (informative; all are functions of step and config, and
    /// resume recomputes and checks them): training phase, gate temperature, EvoMoE spawn step.
    public var phase: TrainingPhase?
    public var temperature: Double?
    public var spawnStep: Int?
    /// Gate state outside the parameters, by layer (ReLU routing's λ).
    public var gateState: [String: [String: Double]]?
    /// Updates skipped for non-finite values so far (schedules count applied updates).
    public var skippedUpdates: Int?
    /// Model FLOPs and seconds of the training steps so far (`TrainingState.trainingFlops`).
    public var trainingFlops: Double?
    public var trainingSeconds: Double?
}

extension CheckpointManifest {
    /// What makes the manifest's fields impossible, if anything: a manifest is input (a file
    /// anyone can edit), and a step, a rank or a file name taken from it unchecked would resume at
    /// a wrong step, index out of range or open files outside the checkpoint.
    public var problem: String? {
        let names = Array(files.keys) + expertFiles.compactMap { $0 }
        if let name = names.first(where: { $0.isEmpty || $0.contains("/") || $0 == "." || $0 == ".." || $0.hasPrefix(".") }) {
            return "file name '\(name)' is not a plain name inside the checkpoint"
        }
        let counts: [(String, Int)] = [("step", step), ("tokens_seen", tokensSeen), ("spawn_step", spawnStep ?? 0),
                                       ("skipped_updates", skippedUpdates ?? 0)] + optimizerSteps.map { ("optimizer_steps." + $0.key, $0.value) }
        if let (key, value) = counts.first(where: { $0.1 < 0 }) { return "\(key) is \(value), below 0" }
        if (skippedUpdates ?? 0) > step { return "skipped_updates \(skippedUpdates ?? 0) exceeds step \(step)" }
        guard worldSize >= 1, vocabularySize >= 1, expertFiles.count == worldSize else {
            return "world_size \(worldSize), vocabulary_size \(vocabularySize) and \(expertFiles.count) expert files do not fit together"
        }
        if let rank = expertRanks.first(where: { !(0..<worldSize).contains($0) }) { return "expert rank \(rank) is outside 0..<\(worldSize)" }
        let numbers = [("learning_rate", learningRate), ("temperature", temperature ?? 0), ("training_flops", trainingFlops ?? 0),
                       ("training_seconds", trainingSeconds ?? 0)] + (gateState ?? [:]).flatMap { layer in layer.value.map { ("gate_state", $0.value) } }
        if let (key, value) = numbers.first(where: { !$0.1.isFinite || ($0.0 != "gate_state" && $0.1 < 0) }) { return "\(key) is \(value)" }
        return nil
    }

    /// The counters saved (checkpoints from before compute accounting have no FLOPs: nil).
    public var trainingState: TrainingState {
        TrainingState(attempted: step, skipped: skippedUpdates ?? 0, trainingFlops: trainingFlops ?? 0, trainingSeconds: trainingSeconds ?? 0)
    }
}

/// What a checkpoint saves: the model with its optimizers' state, the run's counters and config.
public struct CheckpointContents {
    public var model: GPTModel<Float>
    public var replicatedOptimizer: AdamW<Float, Replicated>
    public var expertOptimizer: AdamW<Float, ExpertSharded>
    public var state: TrainingState
    public var config: RunConfig
    /// Runs its argument with every replicated fp32 master value present on this rank
    /// (collective with sharded masters: `Trainer.withAllReplicatedValues`).
    public var withAllReplicatedValues: (() throws -> Void) throws -> Void

    public init(model: GPTModel<Float>, replicatedOptimizer: AdamW<Float, Replicated>, expertOptimizer: AdamW<Float, ExpertSharded>,
                state: TrainingState, config: RunConfig, withAllReplicatedValues: @escaping (() throws -> Void) throws -> Void) {
        self.model = model
        self.replicatedOptimizer = replicatedOptimizer
        self.expertOptimizer = expertOptimizer
        self.state = state
        self.config = config
        self.withAllReplicatedValues = withAllReplicatedValues
    }
}

public enum CheckpointError: Error, CustomStringConvertible {
    case notACheckpoint(path: String, reason: String)
    case corrupt(path: String, reason: String)
    case saveFailed(rank: Int, reason: String)
    case incompatible(path: String, reason: String)
    case snapshotFailed(reason: String)

    public var description: String {
        switch self {
        case let .notACheckpoint(path, reason): return "checkpoint '\(path)': \(reason)"
        case let .corrupt(path, reason): return "checkpoint file '\(path)': \(reason)"
        case let .saveFailed(rank, reason): return "checkpoint save failed on rank \(rank): \(reason)"
        case let .incompatible(path, reason): return "checkpoint '\(path)': \(reason)"
        case let .snapshotFailed(reason): return "checkpoint save: \(reason)"
        }
    }
}

/// Saving and loading of `checkpoints/step_XXXXXXXX/`:
///   replicated.safetensors          replicated parameters + AdamW moments (rank 0)
///   experts-rank-RRRRR.safetensors  each hosting rank's experts + moments, keyed by global id
///   tokenizer.json                  the run's tokenizer, if it has one (tokenizer.bin: llm.c's format)
///   manifest.json                   everything else, with every file's size and SHA-256
///   DONE                            written last by rank 0; a directory without it is ignored
public enum Checkpoint {
    public static let replicatedFile = "replicated.safetensors"
    public static let manifestFile = "manifest.json"
    public static let doneFile = "DONE"
    static let firstMomentPrefix = "optimizer.exp_avg."
    static let secondMomentPrefix = "optimizer.exp_avg_sq."

    public static func directoryName(step: Int) -> String { "step_" + String(format: "%08d", step) }
    public static func expertFileName(rank: Int) -> String { "experts-rank-" + String(format: "%05d", rank) + ".safetensors" }

    /// Complete checkpoints (with DONE) in `runDirectory/checkpoints`, oldest first.
    /// Only real directories count: a `step_*` entry that is a symbolic link is never followed
    /// (loading from it or pruning through it would reach outside the run).
    public static func complete(in runDirectory: String) -> [String] {
        stepDirectories(in: runDirectory).filter { FileManager.default.fileExists(atPath: ($0 as NSString).appendingPathComponent(doneFile)) }
    }

    /// `checkpoints/step_XXXXXXXX` entries that are directories themselves (not links), sorted.
    static func stepDirectories(in runDirectory: String) -> [String] {
        let root = (runDirectory as NSString).appendingPathComponent("checkpoints")
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.filter { $0.hasPrefix("step_") && $0.count == 13 && $0.dropFirst(5).allSatisfy(\.isNumber) }.sorted()
            .map { (root as NSString).appendingPathComponent($0) }
            .filter { (try? FileManager.default.attributesOfItem(atPath: $0)[.type] as? FileAttributeType) == .typeDirectory }
    }

    // MARK: saving

    /// Collective: every rank calls it. Returns the checkpoint directory. Rank 0 also writes
    /// `attachments` (file name -> contents, such as the tokenizer), listed in the manifest.
    @discardableResult
    public static func save(_ contents: CheckpointContents, communicator: Communicator, runDirectory: String,
                            attachments: [String: Data] = [:], hooks: TrainingHooks? = nil) throws -> String {
        let pending = try begin(contents, communicator: communicator, runDirectory: runDirectory, attachments: attachments,
                                hooks: hooks, inBackground: false)
        return try pending.complete(communicator: communicator, wait: true)!
    }

    /// Collective: starts a save. The state is snapshotted now (each writing rank encodes its
    /// files into memory: the parameters and moments once more, the snapshot's cost), then
    /// written, in the background with `inBackground` while the training goes on, and finished by
    /// `PendingCheckpoint.complete` (the manifest, DONE and pruning, as in a blocking save).
    /// `snapshot`: memory kept between saves to encode into (nil: allocated for this save and
    /// released with it).
    public static func begin(_ contents: CheckpointContents, communicator: Communicator, runDirectory: String,
                             attachments: [String: Data] = [:], hooks: TrainingHooks? = nil,
                             inBackground: Bool, snapshot: CheckpointSnapshot? = nil) throws -> PendingCheckpoint {
        let rank = communicator.rank, step = contents.state.attempted
        let directory = ((runDirectory as NSString).appendingPathComponent("checkpoints") as NSString)
            .appendingPathComponent(directoryName(step: step))
        // Rank 0 prepares an empty directory (a leftover without DONE is an interrupted save).
        try communicator.agree {
            guard rank == 0 else { return }
            if FileManager.default.fileExists(atPath: directory) { try FileManager.default.removeItem(atPath: directory) }
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        let snapshot = snapshot ?? CheckpointSnapshot()
        let (shard, replicated) = try encodeState(contents, communicator: communicator, into: snapshot)
        var files = rank == 0 ? attachments : [:]
        if rank == 0 { files[replicatedFile] = replicated }
        let pending = PendingCheckpoint(directory: directory, runDirectory: runDirectory, keep: contents.config.checkpoint.keep,
                                        manifest: makeManifest(contents, worldSize: communicator.size, expertFiles: [], files: [:]),
                                        hooks: hooks, snapshot: snapshot)
        pending.write(shard: shard.map { (expertFileName(rank: rank), $0) }, files: files, inBackground: inBackground)
        return pending
    }

    /// Collective: encodes the state into `snapshot` once, as `begin` will, so that its memory
    /// is mapped and touched before the first save that uses it.
    public static func prepare(_ snapshot: CheckpointSnapshot, for contents: CheckpointContents, communicator: Communicator) throws {
        _ = try encodeState(contents, communicator: communicator, into: snapshot)
    }

    /// Collective: this rank's expert shard (ranks of the first expert-parallel group) and the
    /// replicated file (rank 0; empty elsewhere), encoded into `snapshot`'s memory.
    static func encodeState(_ contents: CheckpointContents, communicator: Communicator,
                            into snapshot: CheckpointSnapshot) throws -> (shard: Data?, replicated: Data) {
        let model = contents.model, optimizer = contents.expertOptimizer
        let shard = try communicator.agree {
            model.placement.groupBase == 0
                ? try encode(model.experts, first: optimizer.firstMoment, second: optimizer.secondMoment, into: snapshot.shard) : nil
        }
        return (shard, try encodeReplicated(contents, communicator: communicator, into: snapshot.replicated))
    }

    /// The replicated parameters and their moments, encoded on rank 0 (empty elsewhere). A
    /// sharded optimizer's slices are gathered (the file holds whole-store moments, so it resumes
    /// on any number of ranks, sharded or not); sharded masters (bf16) are gathered for the
    /// encoding too, and released after.
    static func encodeReplicated(_ contents: CheckpointContents, communicator: Communicator, into buffer: SnapshotBuffer) throws -> Data {
        let optimizer = contents.replicatedOptimizer, store = contents.model.replicated
        let gathered = optimizer.isSharded ? try optimizer.fullMoments(over: communicator) : nil
        var data = Data()
        try contents.withAllReplicatedValues {
            try communicator.agree {
                guard communicator.rank == 0 else { return }
                if let gathered {
                    data = try gathered.first.withUnsafeBufferPointer { first in
                        try gathered.second.withUnsafeBufferPointer { try encode(store, first: first.baseAddress!, second: $0.baseAddress!, into: buffer) }
                    }
                } else {
                    data = try encode(store, first: optimizer.firstMoment, second: optimizer.secondMoment, into: buffer)
                }
            }
        }
        return data
    }

    /// Rank 0: checks that every expert shard is on disk with the size its writer reported (the
    /// writer read it back after its sync and compared it with what it meant to write, and
    /// reports the digest of what it read), adds them to `files`, and returns the shard file of
    /// each rank (nil for ranks holding replicas only).
    static func verifyExpertShards(_ reports: [Int64], directory: String, ranks: Int,
                                   files: inout [String: CheckpointManifest.FileRecord]) throws -> [String?] {
        var expertFiles: [String?] = Array(repeating: nil, count: ranks)
        for source in 0..<ranks where reports[source * 6] == 1 {
            let name = expertFileName(rank: source), bytes = Int(reports[source * 6 + 1])
            let size = (try? FileManager.default.attributesOfItem(atPath: (directory as NSString).appendingPathComponent(name))[.size]) as? Int
            guard size == bytes else {
                throw CheckpointError.saveFailed(rank: source, reason: "\(name) on disk has \(size.map(String.init) ?? "no") bytes, rank \(source) wrote \(bytes)")
            }
            files[name] = CheckpointManifest.FileRecord(bytes: bytes, sha256: digestHex((0..<4).map { reports[source * 6 + 2 + $0] }))
            expertFiles[source] = name
        }
        return expertFiles
    }

    /// The manifest of `contents`: its counters, the schedule positions they imply, the config.
    static func makeManifest(_ contents: CheckpointContents, worldSize: Int, expertFiles: [String?],
                             files: [String: CheckpointManifest.FileRecord]) -> CheckpointManifest {
        let model = contents.model, config = contents.config, state = contents.state, placement = model.placement
        let globalBatchTokens = worldSize * config.train.batchSize * config.model.context * config.train.gradAccum
        return CheckpointManifest(
            step: state.attempted, tokensSeen: state.attempted * globalBatchTokens, worldSize: worldSize,
            vocabularySize: model.vocabularySize,
            expertRanks: (0..<placement.expertCount).map { placement.owner(of: $0) - placement.groupBase },
            expertFiles: expertFiles, learningRate: LearningRateSchedule(config.train).learningRate(at: state.attempted),
            optimizerSteps: optimizerSteps(contents), seed: config.train.seed, config: config.yaml(withHelp: false), files: files,
            phase: model.phase(afterUpdates: state.applied), temperature: model.temperature(afterUpdates: state.applied),
            spawnStep: config.spawnStep,
            gateState: Dictionary(uniqueKeysWithValues: model.moeLayers.compactMap { layer in
                layer.gate.state.isEmpty ? nil : ("blocks.\(layer.layerIndex)", layer.gate.state)
            }), skippedUpdates: state.skipped, trainingFlops: state.trainingFlops, trainingSeconds: state.trainingSeconds)
    }

    /// AdamW step counters: one per replicated entry, one for all experts (they are created and
    /// reset together, so every expert entry on every rank has the same count).
    static func optimizerSteps(_ contents: CheckpointContents) -> [String: Int] {
        var steps: [String: Int] = ["experts": contents.expertOptimizer.stepCount]
        for (index, entry) in contents.model.replicated.entries.enumerated() {
            steps["replicated." + entry.name] = contents.replicatedOptimizer.stepCounts[index]
        }
        return steps
    }

    /// The hexadecimal digest of four words from `digestWord`.
    static func digestHex(_ words: [Int64]) -> String {
        words.map { word in
            let text = String(UInt64(bitPattern: word), radix: 16)
            return String(repeating: "0", count: 16 - text.count) + text
        }.joined()
    }

    static func digestWord(_ hex: String, _ word: Int) -> Int64 {
        let characters = Array(hex.utf8)
        var value: UInt64 = 0
        for index in word * 16..<(word + 1) * 16 {
            let character = characters[index]
            value = value << 4 | UInt64(character <= 57 ? character - 48 : character - 87)
        }
        return Int64(bitPattern: value)
    }

    static func shape(of entry: ParameterEntry) -> [Int] { entry.rows == 1 ? [entry.columns] : [entry.rows, entry.columns] }

    /// The store's values and its AdamW moments (whole-store moments: [store.count] each).
    static func encode<Kind>(_ store: ParameterStore<Float, Kind>, first: UnsafePointer<Float>, second: UnsafePointer<Float>,
                             into buffer: SnapshotBuffer) throws -> Data {
        var entries: [Safetensors.Entry] = []
        for (prefix, base) in [("", UnsafePointer(store.values)), (firstMomentPrefix, first), (secondMomentPrefix, second)] {
            for entry in store.entries {
                entries.append(Safetensors.Entry(name: prefix + entry.name, shape: shape(of: entry),
                                                 values: UnsafeBufferPointer(start: base + entry.offset, count: entry.count)))
            }
        }
        return try Safetensors.encode(entries, metadata: ["format": "pt", "producer": "swiftmoe"], into: buffer)
    }

    /// Writes to a temporary name, fsyncs, renames: a reader sees the old file or the whole new one.
    static func writeDurably(_ data: Data, to path: String, beforeRename: () throws -> Void = {}) throws -> CheckpointManifest.FileRecord {
        let temporary = path + ".partial"
        let record = try data.withUnsafeBytes { try DurableFile.write($0, to: temporary, beforeSync: beforeRename) }
        if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(atPath: path) }
        try FileManager.default.moveItem(atPath: temporary, toPath: path)
        return record
    }

    static func syncDirectory(_ path: String) {
        let descriptor = open(path, O_RDONLY)
        if descriptor >= 0 { fsync(descriptor); close(descriptor) }
    }

    /// Keeps the newest `keep` complete checkpoints; incomplete directories older than the
    /// newest complete one are leftovers of interrupted saves and go too.
    static func prune(runDirectory: String, keep: Int, midway: () throws -> Void = {}) throws {
        let completed = complete(in: runDirectory)
        guard let newest = completed.last else { return }
        for old in completed.dropLast(keep) { try remove(checkpoint: old, midway: midway) }
        for path in stepDirectories(in: runDirectory) where path < newest && !completed.contains(path) {
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    /// Deletes a checkpoint so that a crash at any point never leaves it looking complete with
    /// files missing: DONE goes first (durably), then the files. `midway` runs after the first
    /// file (a test fault kills the process there).
    static func remove(checkpoint directory: String, midway: () throws -> Void = {}) throws {
        let done = (directory as NSString).appendingPathComponent(doneFile)
        if FileManager.default.fileExists(atPath: done) { try FileManager.default.removeItem(atPath: done) }
        syncDirectory(directory)
        for (index, name) in try FileManager.default.contentsOfDirectory(atPath: directory).sorted().enumerated() {
            try FileManager.default.removeItem(atPath: (directory as NSString).appendingPathComponent(name))
            if index == 0 { try midway() }
        }
        try FileManager.default.removeItem(atPath: directory)
    }

    // MARK: loading

    /// The manifest, verified against the digest DONE records (checkpoints from before DONE held
    /// one are read without it) and checked field by field (`validate`).
    public static func readManifest(_ directory: String) throws -> CheckpointManifest {
        let donePath = (directory as NSString).appendingPathComponent(doneFile)
        guard RegularFile.problem(donePath) == nil, let done = FileManager.default.contents(atPath: donePath) else {
            throw CheckpointError.notACheckpoint(path: directory, reason: "no DONE marker (missing directory or an interrupted save)")
        }
        let path = (directory as NSString).appendingPathComponent(manifestFile)
        guard RegularFile.problem(path) == nil, let data = FileManager.default.contents(atPath: path) else {
            throw CheckpointError.corrupt(path: path, reason: "missing or unreadable")
        }
        let recorded = String(decoding: done, as: UTF8.self).split(separator: "\n")
            .first { $0.hasPrefix("manifest_sha256 ") }.map { String($0.dropFirst("manifest_sha256 ".count)) }
        if let recorded, recorded != SHA256.hex(of: data) {
            throw CheckpointError.corrupt(path: path, reason: "its SHA-256 differs from the one DONE records (the manifest was changed after the save)")
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let manifest: CheckpointManifest
        do { manifest = try decoder.decode(CheckpointManifest.self, from: data) } catch {
            throw CheckpointError.corrupt(path: path, reason: "not a valid manifest (\(error))".split(separator: "\n").joined(separator: " "))
        }
        guard manifest.format == CheckpointManifest.currentFormat, manifest.version == CheckpointManifest.currentVersion else {
            throw CheckpointError.corrupt(path: path, reason: "format \(manifest.format) version \(manifest.version) is not \(CheckpointManifest.currentFormat) version \(CheckpointManifest.currentVersion)")
        }
        if let problem = manifest.problem { throw CheckpointError.corrupt(path: path, reason: problem) }
        return manifest
    }

    /// The resolved config stored in a checkpoint.
    public static func config(of manifest: CheckpointManifest, directory: String) throws -> RunConfig {
        try RunConfig.fromResolved(manifest.config, file: (directory as NSString).appendingPathComponent(manifestFile))
    }

    /// Reads a safetensors file listed in the manifest, checking its size and SHA-256.
    static func verifiedFile(_ name: String, in directory: String, manifest: CheckpointManifest) throws -> Safetensors.File {
        try Safetensors.File(path: (directory as NSString).appendingPathComponent(name), data: try verifiedData(name, in: directory, manifest: manifest))
    }

    /// The checkpoint's tokenizer (verified), if the run had one.
    public static func tokenizer(_ directory: String, manifest: CheckpointManifest) throws -> TokenizerFile? {
        guard let name = [Tokenizers.fileName, Tokenizers.llmcFileName].first(where: { manifest.files[$0] != nil }) else { return nil }
        let path = (directory as NSString).appendingPathComponent(name)
        let contents = try verifiedData(name, in: directory, manifest: manifest)
        return TokenizerFile(path: path, contents: contents, tokenizer: try Tokenizers.load(contents, path: path))
    }

    /// Reads a file listed in the manifest and checks its size and SHA-256.
    static func verifiedData(_ name: String, in directory: String, manifest: CheckpointManifest) throws -> Data {
        let path = (directory as NSString).appendingPathComponent(name)
        guard let expected = manifest.files[name] else {
            throw CheckpointError.corrupt(path: path, reason: "not listed in the manifest")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CheckpointError.corrupt(path: path, reason: "missing or unreadable")
        }
        guard data.count == expected.bytes else {
            throw CheckpointError.corrupt(path: path, reason: "\(data.count) bytes, the manifest says \(expected.bytes) (truncated?)")
        }
        let digest = SHA256.hex(of: data)
        guard digest == expected.sha256 else {
            throw CheckpointError.corrupt(path: path, reason: "SHA-256 \(digest) does not match the manifest's \(expected.sha256)")
        }
        return data
    }

    /// Loads parameters (and, with optimizers, AdamW moments and step counts) into a model built
    /// from the checkpoint's config. Experts are found by global id in whichever shard holds them,
    /// so any number of ranks can load any checkpoint.
    public static func load(_ directory: String, manifest: CheckpointManifest, model: GPTModel<Float>,
                            replicatedOptimizer: AdamW<Float, Replicated>? = nil,
                            expertOptimizer: AdamW<Float, ExpertSharded>? = nil) throws {
        let replicated = try verifiedFile(replicatedFile, in: directory, manifest: manifest)
        try read(model.replicated, optimizer: replicatedOptimizer, from: [replicated])
        let needed = Set(model.placement.localExperts.map { manifest.expertRanks.indices.contains($0) ? manifest.expertRanks[$0] : -1 })
        guard !needed.contains(-1) else {
            throw CheckpointError.incompatible(path: directory, reason: "it has \(manifest.expertRanks.count) experts per layer, the model \(model.placement.expertCount)")
        }
        let shards = try needed.sorted().map { source -> Safetensors.File in
            guard source < manifest.expertFiles.count, let name = manifest.expertFiles[source] else {
                throw CheckpointError.corrupt(path: directory, reason: "the manifest lists no expert file for rank \(source)")
            }
            return try verifiedFile(name, in: directory, manifest: manifest)
        }
        try read(model.experts, optimizer: expertOptimizer, from: shards)
        if let replicatedOptimizer {
            for (index, entry) in model.replicated.entries.enumerated() {
                replicatedOptimizer.stepCounts[index] = manifest.optimizerSteps["replicated." + entry.name] ?? manifest.step
            }
        }
        if let expertOptimizer {
            let count = manifest.optimizerSteps["experts"] ?? manifest.step
            for index in expertOptimizer.stepCounts.indices { expertOptimizer.stepCounts[index] = count }
        }
        for layer in model.moeLayers {
            if let state = manifest.gateState?["blocks.\(layer.layerIndex)"] { layer.gate.state = state }
        }
        EvoMoERecipe(model.run).restore(model, step: manifest.step)
    }

    static func read<Kind>(_ store: ParameterStore<Float, Kind>, optimizer: AdamW<Float, Kind>?, from files: [Safetensors.File]) throws {
        for entry in store.entries {
            guard let file = files.first(where: { $0.tensors[entry.name] != nil }) else {
                throw CheckpointError.corrupt(path: files.first?.path ?? "?", reason: "parameter '\(entry.name)' is in no file of this checkpoint")
            }
            try file.read(entry.name, shape: shape(of: entry), into: store.values + entry.offset)
            // A run resumed from non-finite weights would skip every update and, ending, save
            // and prune its way past the good checkpoints: such a checkpoint is not trusted.
            guard Kernels.isFinite(store.values + entry.offset, count: entry.count) else {
                throw CheckpointError.corrupt(path: file.path, reason: "parameter '\(entry.name)' holds non-finite values")
            }
            if let optimizer, !optimizer.isSharded {
                try file.read(firstMomentPrefix + entry.name, shape: shape(of: entry), into: optimizer.firstMoment + entry.offset)
                try file.read(secondMomentPrefix + entry.name, shape: shape(of: entry), into: optimizer.secondMoment + entry.offset)
                guard Kernels.isFinite(optimizer.firstMoment + entry.offset, count: entry.count),
                      Kernels.isFinite(optimizer.secondMoment + entry.offset, count: entry.count) else {
                    throw CheckpointError.corrupt(path: file.path, reason: "the optimizer state of '\(entry.name)' holds non-finite values")
                }
            }
        }
        if let optimizer, optimizer.isSharded { try readSharded(store, optimizer: optimizer, from: files) }
        store.didWriteAllValues()
    }

    /// A sharded optimizer reads the whole-store moments and keeps its slice.
    static func readSharded<Kind>(_ store: ParameterStore<Float, Kind>, optimizer: AdamW<Float, Kind>, from files: [Safetensors.File]) throws {
        var first = [Float](repeating: 0, count: store.count), second = first
        for entry in store.entries {
            guard let file = files.first(where: { $0.tensors[entry.name] != nil }) else { continue }
            try first.withUnsafeMutableBufferPointer {
                try file.read(firstMomentPrefix + entry.name, shape: shape(of: entry), into: $0.baseAddress! + entry.offset)
            }
            try second.withUnsafeMutableBufferPointer {
                try file.read(secondMomentPrefix + entry.name, shape: shape(of: entry), into: $0.baseAddress! + entry.offset)
            }
        }
        optimizer.setMoments(first: first, second: second)
    }
}

extension Checkpoint {
    /// Every problem found in a checkpoint's files (empty when all sizes, digests and
    /// safetensors headers check out).
    public static func verify(_ directory: String, manifest: CheckpointManifest) -> [String] {
        var problems: [String] = []
        for name in manifest.files.keys.sorted() {
            do {
                if name.hasSuffix(".safetensors") {
                    let file = try verifiedFile(name, in: directory, manifest: manifest)
                    if let tensor = file.firstNonFiniteTensor() {
                        throw CheckpointError.corrupt(path: file.path, reason: "tensor '\(tensor)' holds non-finite values")
                    }
                }
                else { _ = try verifiedData(name, in: directory, manifest: manifest) }
            } catch { problems.append("\(error)") }
        }
        for case let name? in manifest.expertFiles where manifest.files[name] == nil {
            problems.append("expert file \(name) is not listed with a digest")
        }
        return problems
    }
}
