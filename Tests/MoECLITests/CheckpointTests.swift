import Foundation
import XCTest
import MoECore

/// Checkpoints through the binary: exact resume, resharding, crash safety, damaged files.
final class CheckpointTests: XCTestCase {
    override func setUpWithError() throws {
        _ = try CLI.requireMPI()
    }

    /// The DTS gate with EvoMoE's spawn at step 4, so resume must restore the phase, the
    /// temperature schedule and the per-tensor AdamW counters.
    static let config = """
        model: {context: 16, width: 16, layers: 2, heads: 2, ffn_hidden: 32, moe_every: 1}
        moe: {experts: 4, top_k: 2, gate: dts}
        evomoe: {spawn_fraction: 0.2}
        dts: {anneal_fraction: 0.5, hard_fraction: 0.8}
        train: {steps: 20, batch_size: 8, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, log_every: 1, eval_every: 10, eval_batches: 2}
        data: {train: data/train.bin, val: data/val.bin}
        checkpoint: {every: 5, keep: 3}
        """

    func losses(_ workspace: Workspace, _ run: String) throws -> [Int: Double] {
        var losses: [Int: Double] = [:]
        for object in try readMetrics(workspace.path("\(run)/metrics.jsonl")) {
            if let loss = object.loss { losses[object.step] = loss }
        }
        return losses
    }

    @discardableResult
    func train(_ workspace: Workspace, ranks: Int, _ arguments: [String], expectSuccess: Bool = true) throws -> CommandResult {
        let batch = ["--set", "train.batch_size=\(8 / ranks)"]
        let result = ranks == 1 ? try CLI.run(["train", "--config", "c.yaml"] + batch + arguments, in: workspace.url)
            : try CLI.mpirun(ranks: ranks, ["train", "--config", "c.yaml"] + batch + arguments, in: workspace.url, timeout: 120)
        if expectSuccess { XCTAssertEqual(result.status, 0, "\(arguments): \(result.stderr)") }
        return result
    }

    /// Stopped at step 10 (after the spawn) and at step 2 (in EvoMoE's dense phase, so the
    /// resumed run must spawn the experts itself at step 4).
    func testExactResumeOnOneAndTwoRanksWithTheDTSGate() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        for ranks in [1, 2] {
            try train(workspace, ranks: ranks, ["--run-dir", "straight\(ranks)"])
            for stop in [10, 2] {
                try assertResumesExactly(workspace, ranks: ranks, straight: "straight\(ranks)", stopAt: stop)
            }
        }
    }

    /// The llama block resumes bit for bit on 2 ranks (stopped after EvoMoE's spawn), and on 1.
    func testExactResumeWithTheLlamaBlock() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let llama = ["--set", "model.architecture=llama", "--set", "model.kv_heads=1", "--set", "model.qk_norm=head",
                     "--set", "model.tie_embeddings=false"]
        for ranks in [2, 1] {
            try train(workspace, ranks: ranks, ["--run-dir", "llama\(ranks)"] + llama)
            try assertResumesExactly(workspace, ranks: ranks, straight: "llama\(ranks)", stopAt: 10, extra: llama)
        }
    }

    /// Loss-free balancing's bias (gate state in the manifest) and group-limited sigmoid routing
    /// with a gated shared expert resume bit for bit on 2 ranks.
    func testExactResumeWithBiasBalancingAndGroupLimitedRouting() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config.replacingOccurrences(of: "gate: dts", with: "gate: topk")
            .replacingOccurrences(of: "spawn_fraction: 0.2", with: "spawn_fraction: 0"))
        let deepseek = ["moe.score=sigmoid", "moe.balance_loss=0", "moe.bias_update_rate=0.01", "moe.expert_groups=2", "moe.group_limit=1", "moe.top_k=1",
                        "moe.sequence_balance_loss=0.01", "moe.shared_experts=1", "moe.shared_gate=true", "moe.routed_scale=2"]
            .flatMap { ["--set", $0] }
        try train(workspace, ranks: 2, ["--run-dir", "deepseek"] + deepseek)
        try assertResumesExactly(workspace, ranks: 2, straight: "deepseek", stopAt: 10, extra: deepseek)
        let manifest = try Checkpoint.readManifest(workspace.path("deepseek/checkpoints/step_00000020"))
        let bias = try XCTUnwrap(manifest.gateState?["blocks.0"])
        XCTAssertEqual(bias.count, 4, "one bias per expert: \(bias)")
        XCTAssertTrue(bias.values.contains { $0 != 0 }, "the bias moved")
        // metrics.jsonl logs the bias and the load per expert of each layer.
        let last = try XCTUnwrap(try readMetrics(workspace.path("deepseek/metrics.jsonl")).last { $0.loss != nil })
        XCTAssertEqual(last.expertBias?.count, 2)
        XCTAssertEqual(last.expertBias?[0], (0..<4).map { bias["bias.\($0)"]! })
        XCTAssertEqual(last.expertLoad?.first?.count, 4)
    }

    /// Stops `run` at `stopAt`, resumes it to the end, and compares every later loss and the
    /// final checkpoint's files bit for bit with the uninterrupted run `straight`.
    func assertResumesExactly(_ workspace: Workspace, ranks: Int, straight: String, stopAt: Int, extra: [String] = [],
                              file: StaticString = #filePath, line: UInt = #line) throws {
        let run = "\(straight)-stop\(stopAt)"
        try train(workspace, ranks: ranks, ["--run-dir", run, "--stop-at", "\(stopAt)"] + extra)
        let resumed = try train(workspace, ranks: ranks, ["--run-dir", run, "--resume"] + extra)
        XCTAssertTrue(resumed.stdout.contains("resumed from \(run)/checkpoints/\(Checkpoint.directoryName(step: stopAt))"),
                      resumed.stdout, file: file, line: line)
        let expected = try losses(workspace, straight), again = try losses(workspace, run)
        XCTAssertEqual(expected.count, 20, file: file, line: line)
        for step in stopAt..<20 {
            XCTAssertEqual(expected[step], again[step], "\(run), \(ranks) ranks, step \(step): not bit-identical", file: file, line: line)
        }
        // The compute count continues from the checkpoint (the last line: the final evaluation).
        let computeStraight = try readMetrics(workspace.path("\(straight)/metrics.jsonl")).last?.trainingFlops
        let computeResumed = try readMetrics(workspace.path("\(run)/metrics.jsonl")).last?.trainingFlops
        XCTAssertNotNil(computeStraight, file: file, line: line)
        XCTAssertEqual(computeStraight, computeResumed, "\(run): training compute after resume", file: file, line: line)
        try assertSameFinalFiles(workspace, straight, run, "\(run), \(ranks) ranks", file: file, line: line)
    }

    /// Every safetensors file of the step-20 checkpoints of runs `straight` and `run` is the same.
    func assertSameFinalFiles(_ workspace: Workspace, _ straight: String, _ run: String, _ label: String,
                              file: StaticString = #filePath, line: UInt = #line) throws {
        let final = "/checkpoints/step_00000020/", files = FileManager.default
        for name in try files.contentsOfDirectory(atPath: workspace.path(straight + final)) where name.hasSuffix(".safetensors") {
            XCTAssertEqual(files.contents(atPath: workspace.path(straight + final + name)), files.contents(atPath: workspace.path(run + final + name)),
                           "\(label): \(name) differs after resume", file: file, line: line)
        }
    }

    /// A periodic checkpoint of an uninterrupted run (not one written because the run stopped
    /// there, and with no evaluation before it: eval_every 0) holds everything the step left:
    /// the straight run's own step-10 checkpoint, its later ones removed, resumes to the same
    /// losses and final files, bit for bit.
    func testPeriodicCheckpointResumesExactly() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let noEvaluation = ["--set", "train.eval_every=0"]
        try train(workspace, ranks: 2, ["--run-dir", "straight"] + noEvaluation)
        let files = FileManager.default
        try files.copyItem(atPath: workspace.path("straight"), toPath: workspace.path("again"))
        for step in [15, 20] { try files.removeItem(atPath: workspace.path("again/checkpoints/" + Checkpoint.directoryName(step: step))) }
        let resumed = try train(workspace, ranks: 2, ["--run-dir", "again", "--resume"] + noEvaluation)
        XCTAssertTrue(resumed.stdout.contains("resumed from again/checkpoints/\(Checkpoint.directoryName(step: 10))"), resumed.stdout)
        let expected = try losses(workspace, "straight"), again = try losses(workspace, "again")
        XCTAssertEqual(expected.count, 20)
        for step in 10..<20 { XCTAssertEqual(expected[step], again[step], "step \(step): not bit-identical") }
        try assertSameFinalFiles(workspace, "straight", "again", "resumed from the periodic checkpoint")
    }

    /// State outside the parameters survives a resume: ReLU routing's adaptive λ (the gate
    /// state in the manifest), and StableMoE's stage 2 (from step 6: frozen distilled router,
    /// whose AdamW counters stop) when stopped before and after the switch.
    func testGateStateSurvivesResume() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let cases: [(name: String, settings: [String], stops: [Int])] = [
            ("relu", ["--set", "moe.gate=relu", "--set", "evomoe.spawn_fraction=0"], [10]),
            ("stablemoe", ["--set", "moe.gate=stablemoe", "--set", "evomoe.spawn_fraction=0",
                           "--set", "gates.stable_stage2_fraction=0.3"], [4, 10]),
        ]
        for (name, settings, stops) in cases {
            try train(workspace, ranks: 2, ["--run-dir", name] + settings)
            for stop in stops { try assertResumesExactly(workspace, ranks: 2, straight: name, stopAt: stop, extra: settings) }
        }
        let manifest = try Checkpoint.readManifest(workspace.path("relu/checkpoints/step_00000020"))
        XCTAssertNotNil(manifest.gateState?["blocks.0"]?["lambda"], "the manifest carries λ")
    }

    /// Saved on 4 ranks, resumed on 2 and on 1 (and saved on 1, resumed on 4): experts and their
    /// AdamW moments move by global id; losses match the 4-rank continuation.
    func testResumeOnAnotherNumberOfRanks() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        try train(workspace, ranks: 4, ["--run-dir", "four"])
        let reference = try losses(workspace, "four")
        for ranks in [2, 1] {
            try train(workspace, ranks: 4, ["--run-dir", "from4to\(ranks)", "--stop-at", "10"])
            try train(workspace, ranks: ranks, ["--run-dir", "from4to\(ranks)", "--resume"])
            let continued = try losses(workspace, "from4to\(ranks)")
            for step in 10..<20 {
                XCTAssertEqual(continued[step]!, reference[step]!, accuracy: 1e-4 * reference[step]!, "4 -> \(ranks) ranks, step \(step)")
            }
        }
        try train(workspace, ranks: 1, ["--run-dir", "from1to4", "--stop-at", "10"])
        try train(workspace, ranks: 4, ["--run-dir", "from1to4", "--resume"])
        let grown = try losses(workspace, "from1to4")
        for step in 10..<20 { XCTAssertEqual(grown[step]!, reference[step]!, accuracy: 1e-4 * reference[step]!, "1 -> 4 ranks, step \(step)") }
    }

    /// A checkpoint saved with a sharded optimizer (2 ranks) holds whole-store moments and (in
    /// bf16, where the masters are sharded too) whole master values: it resumes exactly on the same
    /// 2 ranks, on 1 rank without sharding and on 4 ranks with it, continuing the 2-rank run.
    /// bf16 where the CPU has it (set explicitly: `auto` follows the measured speed), and its
    /// EvoMoE spawn (step 4) reads the dense FFNs' sharded masters.
    func testShardedOptimizerStateResumesOnOtherRankCountsAndUnsharded() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let precision = ["--set", "train.precision=\(BFloat16Support.current.supported ? "bf16" : "fp32")"]
        let shard = ["--set", "train.shard_optimizer=true"] + precision
        try train(workspace, ranks: 2, ["--run-dir", "straight"] + shard)
        let reference = try losses(workspace, "straight")
        for (ranks, settings) in [(2, shard), (1, precision), (4, shard)] {
            let run = "to\(ranks)"
            try train(workspace, ranks: 2, ["--run-dir", run, "--stop-at", "10"] + shard)
            try train(workspace, ranks: ranks, ["--run-dir", run, "--resume"] + settings)
            let continued = try losses(workspace, run)
            for step in 10..<20 {
                if ranks == 2 {
                    XCTAssertEqual(continued[step], reference[step], "2 sharded -> 2 sharded, step \(step): bitwise")
                } else {
                    XCTAssertEqual(continued[step]!, reference[step]!, accuracy: 1e-4 * reference[step]!, "2 sharded -> \(ranks) ranks, step \(step)")
                }
            }
        }
    }

    /// A job ended by an injected kill: a failure exit, and not mpirun's timeout (a hang).
    func assertKilled(_ result: CommandResult, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertNotEqual(result.status, 0, file: file, line: line)
        XCTAssertNotEqual(result.status, 110, "mpirun's timeout fired: the job hung", file: file, line: line)
    }

    /// "run", killed, resumes from the checkpoint of `step` on 2 ranks and then trains exactly
    /// what an uninterrupted run ("straight") trains from that step on.
    func assertResumeContinues(_ workspace: Workspace, from step: Int, extra: [String] = [],
                               file: StaticString = #filePath, line: UInt = #line) throws {
        let resumed = try train(workspace, ranks: 2, ["--run-dir", "run", "--resume"] + extra)
        XCTAssertTrue(resumed.stdout.contains("resumed from run/checkpoints/\(Checkpoint.directoryName(step: step))"), resumed.stdout,
                      file: file, line: line)
        try train(workspace, ranks: 2, ["--run-dir", "straight"] + extra)
        let expected = try losses(workspace, "straight"), actual = try losses(workspace, "run")
        for later in step..<20 { XCTAssertEqual(expected[later], actual[later], "step \(later)", file: file, line: line) }
    }

    /// A rank killed while writing a checkpoint ends the job promptly; the half-written directory
    /// has no DONE, and --resume continues from the previous complete checkpoint.
    func testKillDuringSaveKeepsThePreviousCheckpoint() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let started = Date()
        let killed = try train(workspace, ranks: 2, ["--run-dir", "run", "--inject-fault", "kill-during-save@1:10"], expectSuccess: false)
        assertKilled(killed)
        XCTAssertLessThan(Date().timeIntervalSince(started), 60)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000005/DONE")))
        XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000010/DONE")))
        try assertResumeContinues(workspace, from: 5)
    }

    /// Asynchronous saves (checkpoint.async): a rank killed while its background thread writes
    /// the shard of step 10 leaves step 5 complete and step 10 without DONE, the resume is exact,
    /// and the files of a background save are byte for byte those of a blocking one.
    func testAsynchronousSavesSurviveACrashAndWriteWhatABlockingSaveWrites() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let async = ["--set", "checkpoint.async=true"]
        let killed = try train(workspace, ranks: 2, ["--run-dir", "run", "--inject-fault", "kill-during-save@1:10"] + async,
                               expectSuccess: false)
        assertKilled(killed)
        XCTAssertTrue(killed.stdout.contains("saved run/checkpoints/step_00000005 in the background"), killed.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000005/DONE")))
        XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000010/DONE")))
        try assertResumeContinues(workspace, from: 5, extra: async)
        // Rank 0 finishes a background save on its own thread too: killed there between the
        // manifest and DONE, step 10 is not a checkpoint and the resume continues from step 5.
        let finishing = workspace.path("finishing")
        let killedFinishing = try train(workspace, ranks: 2, ["--run-dir", "finishing", "--inject-fault", "kill-before-done@0:10"] + async,
                                        expectSuccess: false)
        assertKilled(killedFinishing)
        XCTAssertTrue(FileManager.default.fileExists(atPath: finishing + "/checkpoints/step_00000010/manifest.json"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: finishing + "/checkpoints/step_00000010/DONE"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: finishing + "/checkpoints/step_00000005/DONE"))
        try train(workspace, ranks: 2, ["--run-dir", "blocking"])
        for file in ["replicated.safetensors", "experts-rank-00000.safetensors", "experts-rank-00001.safetensors"] {
            let path = { (run: String) in workspace.path("\(run)/checkpoints/step_00000015/\(file)") }
            XCTAssertEqual(FileManager.default.contents(atPath: path("straight")), FileManager.default.contents(atPath: path("blocking")), file)
        }
    }

    /// Rank 0 killed after writing the manifest of step 10 and before DONE: the directory is
    /// ignored and --resume continues from step 5, exactly.
    func testRankZeroCrashBetweenManifestAndDone() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let killed = try train(workspace, ranks: 2, ["--run-dir", "run", "--inject-fault", "kill-before-done@0:10"], expectSuccess: false)
        assertKilled(killed)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000010/manifest.json")))
        XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000010/DONE")))
        try assertResumeContinues(workspace, from: 5)
    }

    /// Rank 0 killed while pruning (keep 1: saving step 10 deletes step 5), one file of step 5
    /// already gone: no directory may look complete with files missing. Every checkpoint with
    /// DONE verifies, --resume continues from step 10 exactly, and the next save removes the
    /// leftover.
    func testRankZeroCrashWhilePruning() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let keepOne = ["--set", "checkpoint.keep=1"]
        let killed = try train(workspace, ranks: 2, ["--run-dir", "run", "--inject-fault", "kill-during-prune@0:10"] + keepOne,
                               expectSuccess: false)
        assertKilled(killed)
        let root = workspace.path("run/checkpoints")
        let left = try FileManager.default.contentsOfDirectory(atPath: root).sorted()
        XCTAssertEqual(left, ["step_00000005", "step_00000010"], "the kill came midway through deleting step 5")
        for name in left where FileManager.default.fileExists(atPath: "\(root)/\(name)/DONE") {
            let verify = try CLI.run(["checkpoint", "verify", "run/checkpoints/\(name)"], in: workspace.url)
            XCTAssertEqual(verify.status, 0, "\(name) has DONE but does not verify: \(verify.stderr)")
        }
        try assertResumeContinues(workspace, from: 10, extra: keepOne)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root), ["step_00000020"], "the resumed run pruned the leftover")
    }

    /// Each kind of damage to the newest checkpoint (saved on 2 ranks) is reported naming the
    /// file and the reason, `checkpoint verify` fails, and --resume on 1 rank and on 2 ranks falls
    /// back to the previous complete checkpoint. Rank 1's shard is the damaged one, so on 2
    /// ranks the error is rank 1's and must still reach rank 0's log.
    func testDamagedCheckpointsAreRefusedAndResumeFallsBack() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config + "\n")
        try train(workspace, ranks: 2, ["--run-dir", "base", "--stop-at", "15"])
        let newest = "checkpoints/step_00000015/"
        typealias Damage = (name: String, file: String, reported: String, reason: String, apply: (String) throws -> Void)
        func rewrite(_ path: String, _ change: (inout Data) -> Void) throws {
            var data = try XCTUnwrap(FileManager.default.contents(atPath: path))
            change(&data)
            try data.write(to: URL(fileURLWithPath: path))
        }
        let shard = "experts-rank-00001.safetensors", digestMismatch = "does not match the manifest's"
        let damages: [Damage] = [
            ("truncated file", "replicated.safetensors", "replicated.safetensors", "(truncated?)",
             { path in try rewrite(path) { $0 = $0.prefix($0.count / 2) } }),
            ("flipped byte", shard, shard, digestMismatch, { path in try rewrite(path) { $0[$0.count - 10] ^= 0x01 } }),
            // DONE records the manifest's digest: any edit of the manifest is caught whole.
            ("wrong digest in the manifest", "manifest.json", "manifest.json", "differs from the one DONE records", { path in
                try rewrite(path) { data in
                    var text = String(decoding: data, as: UTF8.self)
                    let range = text.range(of: "\"sha256\" : \"")!
                    text.replaceSubrange(range.upperBound..<text.index(range.upperBound, offsetBy: 4), with: "0000")
                    data = Data(text.utf8)
                }
            }),
            ("one bit of the step flipped", "manifest.json", "manifest.json", "differs from the one DONE records", { path in
                try rewrite(path) { data in data = Data(String(decoding: data, as: UTF8.self)
                    .replacingOccurrences(of: "\"step\" : 15", with: "\"step\" : 14").utf8) }
            }),
            // A manifest edited and its digest left out of DONE (as in checkpoints older than the
            // digest): the fields themselves are checked.
            ("negative step", "manifest.json", "manifest.json", "step is -15, below 0", { path in
                try Self.editWithoutDigest(path) { $0.replacingOccurrences(of: "\"step\" : 15", with: "\"step\" : -15") }
            }),
            ("a file name leaving the checkpoint", "manifest.json", "manifest.json", "'../../c.yaml' is not a plain name", { path in
                try Self.editWithoutDigest(path) { $0.replacingOccurrences(of: "\"tokenizer.json\"", with: "\"../../c.yaml\"")
                    .replacingOccurrences(of: "\"experts-rank-00000.safetensors\" :", with: "\"../../c.yaml\" :") }
            }),
            ("non-finite weights with matching digests", "replicated.safetensors", "replicated.safetensors", "non-finite values", { path in
                try rewrite(path) { data in   // a NaN as the first value of the data section
                    let start = 8 + Int(data.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
                    data.replaceSubrange(start..<(start + 4), with: [0x00, 0x00, 0xc0, 0x7f])
                }
                let data = try XCTUnwrap(FileManager.default.contents(atPath: path))
                try Self.editWithoutDigest((path as NSString).deletingLastPathComponent + "/manifest.json") { text in
                    let name = "\"replicated.safetensors\" : {", start = text.range(of: name)!
                    let digest = text.range(of: "\"sha256\" : \"", range: start.upperBound..<text.endIndex)!
                    var edited = text
                    edited.replaceSubrange(digest.upperBound..<text.index(digest.upperBound, offsetBy: 64), with: SHA256.hex(of: data))
                    return edited
                }
            }),
            ("missing shard", shard, shard, "missing or unreadable", { path in try FileManager.default.removeItem(atPath: path) }),
            // Rewritten through a String, the binary payload's invalid UTF-8 grows: a size mismatch.
            ("header offsets past the end", "replicated.safetensors", "replicated.safetensors", "bytes, the manifest says", { path in
                try rewrite(path) { data in
                    var text = String(decoding: data, as: UTF8.self)
                    let range = text.range(of: "\"data_offsets\":[0,")!
                    text.replaceSubrange(range, with: "\"data_offsets\":[9")
                    data = Data(text.utf8)
                }
            }),
            ("absurd header length", "replicated.safetensors", "replicated.safetensors", digestMismatch, { path in
                try rewrite(path) { data in withUnsafeBytes(of: UInt64(1) << 60) { data.replaceSubrange(0..<8, with: $0) } }
            }),
        ]
        for (index, damage) in damages.enumerated() {
            let run = "damaged-\(index)"
            try FileManager.default.copyItem(atPath: workspace.path("base"), toPath: workspace.path(run))
            try damage.apply(workspace.path(run + "/" + newest + damage.file))
            let verify = try CLI.run(["checkpoint", "verify", run + "/" + newest], in: workspace.url)
            XCTAssertNotEqual(verify.status, 0, "\(damage.name): verify passed")
            XCTAssertTrue(verify.stderr.contains(damage.reported) && verify.stderr.contains(damage.reason), "\(damage.name): \(verify.stderr)")
            for ranks in [1, 2] {
                let attempt = "\(run)-on-\(ranks)"
                try FileManager.default.copyItem(atPath: workspace.path(run), toPath: workspace.path(attempt))
                let resumed = try train(workspace, ranks: ranks, ["--run-dir", attempt, "--resume", "--stop-at", "11"])
                let warning = resumed.stdout.split(separator: "\n").first { $0.contains("warning: skipping checkpoint") } ?? ""
                XCTAssertTrue(warning.contains(damage.reported) && warning.contains(damage.reason), "\(damage.name), \(ranks) ranks: \(resumed.stdout)")
                XCTAssertTrue(resumed.stdout.contains("resumed from \(attempt)/checkpoints/step_00000010"),
                              "\(damage.name), \(ranks) ranks: \(resumed.stdout)")
            }
        }
    }

    /// Edits `manifest` through `change` and rewrites DONE as checkpoints before the manifest
    /// digest had it (step only), so that the edit reaches the manifest's own checks.
    static func editWithoutDigest(_ manifest: String, _ change: (String) -> String) throws {
        let text = try String(contentsOfFile: manifest, encoding: .utf8)
        try change(text).write(toFile: manifest, atomically: true, encoding: .utf8)
        try "step 15\n".write(toFile: (manifest as NSString).deletingLastPathComponent + "/DONE", atomically: true, encoding: .utf8)
    }

    /// Entries that look like checkpoints and are not are never trusted: a `step_*` directory
    /// that is a symbolic link (pruning used to delete the files it points to), and a stray
    /// DONE in a directory with no manifest (resume used to stop on it instead of falling back).
    func testLinksAndStrayMarkersAreNotCheckpoints() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config + "\n")
        try train(workspace, ranks: 1, ["--run-dir", "run", "--stop-at", "10"])
        // Outside the run: a directory the link points to, which must survive pruning.
        try FileManager.default.createDirectory(atPath: workspace.path("precious"), withIntermediateDirectories: true)
        try workspace.write("precious/DONE", "step 1\n")
        try workspace.write("precious/manifest.json", "{}")
        try FileManager.default.createSymbolicLink(atPath: workspace.path("run/checkpoints/step_00000001"), withDestinationPath: workspace.path("precious"))
        try FileManager.default.createDirectory(atPath: workspace.path("run/checkpoints/step_00000099"), withIntermediateDirectories: true)
        try workspace.write("run/checkpoints/step_00000099/DONE", "step 99\n")
        let resumed = try train(workspace, ranks: 1, ["--run-dir", "run", "--resume"])
        XCTAssertTrue(resumed.stdout.contains("warning: skipping checkpoint run/checkpoints/step_00000099"), resumed.stdout)
        XCTAssertTrue(resumed.stdout.contains("resumed from run/checkpoints/step_00000010"), resumed.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("precious/manifest.json")), "pruning followed the link")
    }

    /// Any safetensors reader opens the files (checked with the reference Python package when
    /// it is installed).
    func testStandardSafetensorsReaderOpensTheFiles() throws {
        try CLI.requirePython("safetensors.numpy", "the Python safetensors package is not installed (pip install safetensors numpy)")
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        try train(workspace, ranks: 2, ["--run-dir", "run", "--set", "train.steps=5"])
        let result = try CLI.python(["-c", """
            import sys, safetensors.numpy as st
            r = st.load_file(sys.argv[1]); e = st.load_file(sys.argv[2])
            assert r['embedding.token'].shape == (256, 16) and str(r['embedding.token'].dtype) == 'float32'
            assert e['blocks.0.moe.experts.1.up.weight'].shape == (16, 32)
            assert 'optimizer.exp_avg.blocks.0.moe.experts.1.up.weight' in e
            print(len(r), len(e))
            """, workspace.path("run/checkpoints/step_00000005/replicated.safetensors"),
            workspace.path("run/checkpoints/step_00000005/experts-rank-00000.safetensors")])
        XCTAssertEqual(result.status, 0, result.stderr)
    }
}
