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
            if let step = object["step"] as? Int, let loss = object["loss"] as? Double { losses[step] = loss }
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

    func testExactResumeOnOneAndTwoRanksWithTheDTSGate() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        for ranks in [1, 2] {
            try train(workspace, ranks: ranks, ["--run-dir", "straight\(ranks)"])
            try train(workspace, ranks: ranks, ["--run-dir", "resumed\(ranks)", "--stop-at", "10"])
            let resumed = try train(workspace, ranks: ranks, ["--run-dir", "resumed\(ranks)", "--resume"])
            XCTAssertTrue(resumed.stdout.contains("resumed from"), resumed.stdout)
            let straight = try losses(workspace, "straight\(ranks)"), again = try losses(workspace, "resumed\(ranks)")
            XCTAssertEqual(straight.count, 20)
            for step in 10..<20 { XCTAssertEqual(straight[step], again[step], "\(ranks) ranks, step \(step): not bit-identical") }
            let final = "/checkpoints/step_00000020/"
            for file in try FileManager.default.contentsOfDirectory(atPath: workspace.path("straight\(ranks)" + final))
            where file.hasSuffix(".safetensors") {
                XCTAssertEqual(FileManager.default.contents(atPath: workspace.path("straight\(ranks)" + final + file)),
                               FileManager.default.contents(atPath: workspace.path("resumed\(ranks)" + final + file)),
                               "\(ranks) ranks: \(file) differs after resume")
            }
        }
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

    /// A rank killed while writing a checkpoint ends the job promptly; the half-written directory
    /// has no DONE, and --resume continues from the previous complete checkpoint.
    func testKillDuringSaveKeepsThePreviousCheckpoint() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let started = Date()
        let killed = try train(workspace, ranks: 2, ["--run-dir", "run", "--inject-fault", "kill-during-save@1:10"], expectSuccess: false)
        XCTAssertNotEqual(killed.status, 0)
        XCTAssertNotEqual(killed.status, 110, "mpirun's timeout fired: the job hung")
        XCTAssertLessThan(Date().timeIntervalSince(started), 60)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000005/DONE")))
        XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000010/DONE")))
        let resumed = try train(workspace, ranks: 2, ["--run-dir", "run", "--resume"])
        XCTAssertTrue(resumed.stdout.contains("step_00000005"), resumed.stdout)
        try train(workspace, ranks: 2, ["--run-dir", "straight"])
        let expected = try losses(workspace, "straight"), actual = try losses(workspace, "run")
        for step in 5..<20 { XCTAssertEqual(expected[step], actual[step], "step \(step)") }
    }

    /// Each kind of damage to the newest checkpoint is reported naming the file, `checkpoint
    /// verify` fails, and --resume falls back to the previous complete checkpoint.
    func testDamagedCheckpointsAreRefusedAndResumeFallsBack() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config + "\n")
        try train(workspace, ranks: 1, ["--run-dir", "base", "--stop-at", "15"])
        let newest = "checkpoints/step_00000015/"
        typealias Damage = (name: String, file: String, reported: String, apply: (String) throws -> Void)
        func rewrite(_ path: String, _ change: (inout Data) -> Void) throws {
            var data = try XCTUnwrap(FileManager.default.contents(atPath: path))
            change(&data)
            try data.write(to: URL(fileURLWithPath: path))
        }
        let damages: [Damage] = [
            ("truncated file", "replicated.safetensors", "replicated.safetensors", { path in try rewrite(path) { $0 = $0.prefix($0.count / 2) } }),
            ("flipped byte", "experts-rank-00000.safetensors", "experts-rank-00000.safetensors", { path in try rewrite(path) { $0[$0.count - 10] ^= 0x01 } }),
            ("wrong digest in the manifest", "manifest.json", "experts-rank-00000.safetensors", { path in   // the first digest listed
                try rewrite(path) { data in
                    var text = String(decoding: data, as: UTF8.self)
                    let range = text.range(of: "\"sha256\" : \"")!
                    text.replaceSubrange(range.upperBound..<text.index(range.upperBound, offsetBy: 4), with: "0000")
                    data = Data(text.utf8)
                }
            }),
            ("missing shard", "experts-rank-00000.safetensors", "experts-rank-00000.safetensors", { path in try FileManager.default.removeItem(atPath: path) }),
            ("header offsets past the end", "replicated.safetensors", "replicated.safetensors", { path in
                try rewrite(path) { data in
                    var text = String(decoding: data, as: UTF8.self)
                    let range = text.range(of: "\"data_offsets\":[0,")!
                    text.replaceSubrange(range, with: "\"data_offsets\":[9")
                    data = Data(text.utf8)
                }
            }),
            ("absurd header length", "replicated.safetensors", "replicated.safetensors", { path in
                try rewrite(path) { data in withUnsafeBytes(of: UInt64(1) << 60) { data.replaceSubrange(0..<8, with: $0) } }
            }),
        ]
        for damage in damages {
            let run = "damaged-\(damages.firstIndex { $0.name == damage.name }!)"
            try? FileManager.default.removeItem(atPath: workspace.path(run))
            try FileManager.default.copyItem(atPath: workspace.path("base"), toPath: workspace.path(run))
            try damage.apply(workspace.path(run + "/" + newest + damage.file))
            let verify = try CLI.run(["checkpoint", "verify", run + "/" + newest], in: workspace.url)
            XCTAssertNotEqual(verify.status, 0, "\(damage.name): verify passed")
            XCTAssertTrue(verify.stderr.contains(damage.reported), "\(damage.name): \(verify.stderr)")
            let resumed = try train(workspace, ranks: 1, ["--run-dir", run, "--resume"])
            XCTAssertTrue(resumed.stdout.contains("warning: skipping checkpoint") && resumed.stdout.contains(damage.reported),
                          "\(damage.name): \(resumed.stdout)")
            XCTAssertTrue(resumed.stdout.contains("resumed from \(run)/checkpoints/step_00000010"), "\(damage.name): \(resumed.stdout)")
        }
    }

    /// Any safetensors reader opens the files (checked with the reference Python package when
    /// it is installed).
    func testStandardSafetensorsReaderOpensTheFiles() throws {
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        probe.arguments = ["python3", "-c", "import safetensors.numpy"]
        guard (try? CLI.capture(probe))?.status == 0 else {
            throw XCTSkip("the Python safetensors package is not installed (pip install safetensors numpy)")
        }
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        try train(workspace, ranks: 2, ["--run-dir", "run", "--set", "train.steps=5"])
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", """
            import sys, safetensors.numpy as st
            r = st.load_file(sys.argv[1]); e = st.load_file(sys.argv[2])
            assert r['embedding.token'].shape == (256, 16) and str(r['embedding.token'].dtype) == 'float32'
            assert e['blocks.0.moe.experts.1.up.weight'].shape == (16, 32)
            assert 'optimizer.exp_avg.blocks.0.moe.experts.1.up.weight' in e
            print(len(r), len(e))
            """, workspace.path("run/checkpoints/step_00000005/replicated.safetensors"),
            workspace.path("run/checkpoints/step_00000005/experts-rank-00000.safetensors")]
        let result = try CLI.capture(process)
        XCTAssertEqual(result.status, 0, result.stderr)
    }
}
