import Foundation
import XCTest
import MoECore

/// Faults injected under `mpirun -np 2 --timeout`: each ends promptly with a message naming the
/// rank (or skips the step), never hangs, and the last complete checkpoint still verifies and
/// resumes.
final class FaultTests: XCTestCase {
    override func setUpWithError() throws {
        _ = try CLI.requireMPI()
    }

    /// stall_seconds 15: the watchdog must catch the sleeping rank well inside mpirun's 90 s
    /// timeout, yet never mistake a checkpoint save on a slow disk (each file is fsynced) for a
    /// stall; saves here take milliseconds on a local disk and seconds on a busy CI volume.
    static let config = """
        model: {context: 16, width: 16, layers: 2, heads: 2, ffn_hidden: 32, moe_every: 1}
        moe: {experts: 4, top_k: 2, gate: topk}
        evomoe: {spawn_fraction: 0}
        train: {steps: 20, batch_size: 4, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, log_every: 1, eval_every: 0, eval_batches: 2, stall_seconds: 15}
        data: {train: data/train.bin, val: data/val.bin}
        checkpoint: {every: 5, keep: 5}
        """

    func run(_ workspace: Workspace, _ arguments: [String]) throws -> (CommandResult, TimeInterval) {
        let started = Date()
        let result = try CLI.mpirun(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", "run"] + arguments, in: workspace.url,
                                    timeout: 90)
        return (result, Date().timeIntervalSince(started))
    }

    /// After a failed job: the last complete checkpoint verifies and the run resumes from it.
    func assertRecoverable(_ workspace: Workspace, from step: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        let directory = "run/checkpoints/" + Checkpoint.directoryName(step: step)
        let verify = try CLI.run(["checkpoint", "verify", directory], in: workspace.url)
        XCTAssertEqual(verify.status, 0, verify.stderr, file: file, line: line)
        let (resumed, _) = try run(workspace, ["--resume"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr, file: file, line: line)
        XCTAssertTrue(resumed.stdout.contains("resumed from \(directory)"), resumed.stdout, file: file, line: line)
    }

    func testKilledRankEndsTheJobPromptly() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let (result, seconds) = try run(workspace, ["--inject-fault", "kill@1:7"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertNotEqual(result.status, 110, "mpirun's timeout fired: the job hung")
        XCTAssertLessThan(seconds, 30)
        XCTAssertTrue((result.stdout + result.stderr).contains("rank 1"), result.stderr)
        try assertRecoverable(workspace, from: 5)
    }

    /// launch/train.sh with RESTARTS relaunches a job whose rank was killed from its newest
    /// checkpoint, and it ends with the parameters of a job never interrupted (bitwise, same
    /// ranks); with MIN_RANKS 1 the restart runs on half the ranks. A bad argument is not
    /// restarted (the same input would fail again).
    func testKilledJobRestartsByItselfAndFinishesAsIfUninterrupted() throws {
        let workspace = try Workspace()
        // The script runs from the repository: absolute paths.
        try workspace.write("c.yaml", Self.config.replacingOccurrences(of: "data/", with: workspace.path("data") + "/"))
        let environment = ["RANKS": "2", "RESTARTS": "2", "TIMEOUT": "90"]
        let run = { (name: String) in workspace.path(name) }
        let train = ["--config", workspace.path("c.yaml"), "--run-dir"]
        let restarted = try CLI.launchScript("train.sh", train + [run("restarted"), "--inject-fault", "kill-once@1:7"], in: workspace.url,
                                             environment: environment)
        XCTAssertEqual(restarted.status, 0, restarted.stderr)
        XCTAssertTrue(restarted.stderr.contains("restart 1 of 2: the job ended with status 137; resuming \(run("restarted")) from \(run("restarted"))/checkpoints/step_00000005 on 2 ranks"),
                      restarted.stderr)
        XCTAssertTrue(restarted.stdout.contains("resumed from \(run("restarted"))/checkpoints/step_00000005"), restarted.stdout + restarted.stderr)
        let straight = try CLI.launchScript("train.sh", train + [run("straight")], in: workspace.url, environment: environment)
        XCTAssertEqual(straight.status, 0, straight.stderr)
        for file in ["replicated.safetensors", "experts-rank-00000.safetensors", "experts-rank-00001.safetensors"] {
            let path = { (run: String) in workspace.path("\(run)/checkpoints/step_00000020/\(file)") }
            XCTAssertEqual(FileManager.default.contents(atPath: path("restarted")), FileManager.default.contents(atPath: path("straight")), file)
        }
        let fewer = try CLI.launchScript("train.sh", train + [run("fewer"), "--inject-fault", "kill-once@1:7"], in: workspace.url,
                                         environment: environment.merging(["MIN_RANKS": "1"]) { $1 })
        XCTAssertEqual(fewer.status, 0, fewer.stderr)
        XCTAssertTrue(fewer.stderr.contains("on 1 ranks") && fewer.stdout.contains("(saved on 2 ranks)"), fewer.stderr + fewer.stdout)
        let bad = try CLI.launchScript("train.sh", train + [run("bad"), "--set", "train.steps=-1"], in: workspace.url, environment: environment)
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("not restarting") && !bad.stderr.contains("restart 1"), bad.stderr)
    }

    func testSleepingRankIsCaughtByTheWatchdog() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let (result, seconds) = try run(workspace, ["--inject-fault", "sleep@1:7"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertNotEqual(result.status, 110, "mpirun's timeout fired: the job hung")
        XCTAssertLessThan(seconds, 45)
        XCTAssertTrue(result.stderr.contains("stalled for") && result.stderr.contains("at step 7"), result.stderr)
        try assertRecoverable(workspace, from: 5)
    }

    func testDataOneRankCannotReadStopsEveryRankWithItsMessage() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let (result, seconds) = try run(workspace, ["--inject-fault", "data-unreadable@1"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertLessThan(seconds, 30)
        XCTAssertTrue(result.stderr.contains("error (rank 1): token file 'data/train.bin': cannot read it"), result.stderr)
        XCTAssertTrue(result.stderr.contains("error (rank 0): rank 1 failed: token file 'data/train.bin'"), result.stderr)
        XCTAssertFalse(result.stderr.contains("MPI_ABORT"), "agreed errors end cleanly: \(result.stderr)")
    }

    /// Ranks given different configs (here another learning rate on rank 1, through mpirun's
    /// MPMD form) stop before training, every rank naming the one that differs; they used to
    /// train and save with different learning rates.
    func testRanksWithDifferentConfigsStopBeforeTraining() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let train = ["train", "--config", "c.yaml", "--run-dir", "run"]
        let result = try CLI.mpirun(ranks: 1, train + [":", "-np", "1", CLI.executable.path] + train + ["--set", "train.lr=0.5"],
                                    in: workspace.url, timeout: 90)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("rank 1 resolved another config than rank 0"), result.stderr)
        XCTAssertTrue(result.stderr.contains("error (rank 0): rank 1 failed"), result.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("run/metrics.jsonl")), "no rank trained")
    }

    func testNaNGradientOnOneRankSkipsTheStepOnAllRanks() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let (result, _) = try run(workspace, ["--inject-fault", "nan-gradient@1:7"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.contains("warning: step 7 skipped"), result.stdout)
        let metrics = try readMetrics(workspace.path("run/metrics.jsonl")).filter(\.isTrainingStep)
        XCTAssertEqual(metrics.last?.skippedUpdates, 1)
        // With no skips allowed, the run stops naming where the NaN appeared.
        let stop = try Workspace()
        try stop.write("c.yaml", Self.config)
        let (stopped, _) = try run(stop, ["--inject-fault", "nan-gradient@1:7", "--set", "train.max_consecutive_skips=0"])
        XCTAssertNotEqual(stopped.status, 0)
        XCTAssertTrue(stopped.stderr.contains("first at step 7, in the gradient of embedding.token"), stopped.stderr)
        try assertRecoverable(stop, from: 5)
    }

    /// SIGTERM (what Slurm sends before a time limit) to one rank of two: both finish the same
    /// step, write a checkpoint and exit 0; --resume then continues exactly.
    /// The training file truncated under a running 2-rank job: the rank that reads past the new
    /// end names the file and exits 74, and mpirun ends the job (a SIGBUS crash report before).
    func testTokenFileTruncatedUnderARunEndsWithItsName() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        try FileManager.default.copyItem(atPath: workspace.path("data/train.bin"), toPath: workspace.path("data/mine.bin"))
        let process = try CLI.mpirunProcess(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", "run", "--set", "train.steps=100000",
                                                       "--set", "checkpoint.every=0", "--set", "data.train=data/mine.bin"], in: workspace.url)
        let errors = Pipe()
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = errors
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        let metrics = workspace.path("run/metrics.jsonl"), deadline = Date().addingTimeInterval(60)
        while Date() < deadline, ((try? readMetrics(metrics))?.filter(\.isTrainingStep).count ?? 0) < 2 { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertEqual(truncate(workspace.path("data/mine.bin"), 1024), 0)
        let waitLimit = Date().addingTimeInterval(60)
        while process.isRunning && Date() < waitLimit { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertFalse(process.isRunning, "the job did not end within 60 s of the truncation")
        let stderr = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertNotEqual(process.terminationStatus, 0)
        XCTAssertTrue(stderr.contains("token file 'data/mine.bin' was truncated or replaced while the run read it"), stderr)
        XCTAssertFalse(stderr.contains("Backtracing"), stderr)
    }

    func testSIGTERMFinishesTheStepCheckpointsAndExitsCleanly() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let long = ["--set", "train.steps=100000", "--set", "checkpoint.every=0"]
        let process = try CLI.mpirunProcess(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", "run"] + long, in: workspace.url)
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        // Wait for a few logged steps, then signal one rank (a child of mpirun).
        let metrics = workspace.path("run/metrics.jsonl")
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline, ((try? readMetrics(metrics))?.filter(\.isTrainingStep).count ?? 0) < 3 {
            Thread.sleep(forTimeInterval: 0.05)
        }
        let children = try CLI.capture(shell("pgrep -P \(process.processIdentifier)")).stdout
            .split(separator: "\n").compactMap { Int32($0) }
        XCTAssertEqual(children.count, 2, "mpirun's two ranks")
        let signalled = try XCTUnwrap(children.last)
        XCTAssertEqual(kill(signalled, SIGTERM), 0)
        let waitLimit = Date().addingTimeInterval(60)
        while process.isRunning && Date() < waitLimit { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertFalse(process.isRunning, "the job did not stop within 60 s of SIGTERM")
        XCTAssertEqual(process.terminationStatus, 0, "a requested stop exits 0")
        let steps = try readMetrics(metrics).map(\.step)
        let stopped = try XCTUnwrap(steps.max()) + 1
        let checkpoint = "run/checkpoints/" + Checkpoint.directoryName(step: stopped)
        XCTAssertEqual(try Checkpoint.readManifest(workspace.path(checkpoint)).step, stopped, "the checkpoint is of the last finished step")
        XCTAssertEqual(try CLI.run(["checkpoint", "verify", checkpoint], in: workspace.url).status, 0)
        // The stopped run, resumed for 3 more steps, equals an uninterrupted run to that step.
        let end = ["--stop-at", "\(stopped + 3)"]
        let resumed = try CLI.mpirun(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", "run", "--resume"] + long + end,
                                     in: workspace.url)
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        let straight = try CLI.mpirun(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", "straight"] + long + end, in: workspace.url)
        XCTAssertEqual(straight.status, 0, straight.stderr)
        func losses(_ run: String) throws -> [Int: Double] {
            var losses: [Int: Double] = [:]
            for object in try readMetrics(workspace.path("\(run)/metrics.jsonl")) {
                if let loss = object.loss { losses[object.step] = loss }
            }
            return losses
        }
        let expected = try losses("straight"), actual = try losses("run")
        for step in stopped..<(stopped + 3) { XCTAssertEqual(expected[step], actual[step], "step \(step) after the resume") }
    }

    func shell(_ command: String) -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        return process
    }

    /// Random bytes where a config, a token file or a manifest belongs: an error line, never a
    /// crash by signal.
    func testHostileFilesNeverCrash() throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        try CLI.run(["train", "--config", "c.yaml", "--run-dir", "good", "--set", "train.steps=5"], in: workspace.url)
        var state: UInt64 = 0x2545_F491_4F6C_DD1D
        func bytes(_ count: Int) -> [UInt8] {
            (0..<count).map { _ in state ^= state << 13; state ^= state >> 7; state ^= state << 17; return UInt8(truncatingIfNeeded: state) }
        }
        let manifest = workspace.path("good/checkpoints/step_00000005/manifest.json")
        let original = try XCTUnwrap(FileManager.default.contents(atPath: manifest))
        for trial in 0..<12 {
            let size = [0, 7, 100, 1024, 1030, 5000][trial % 6]
            try workspace.write("hostile.yaml", bytes: bytes(size))
            try workspace.write("data/hostile.bin", bytes: trial % 2 == 0 ? bytes(size) : Array(original.prefix(1024)) + bytes(size))
            var mangled = original
            for _ in 0..<(1 + trial) { mangled[Int(state % UInt64(mangled.count))] = bytes(1)[0] }
            try (trial % 3 == 0 ? Data(bytes(size)) : mangled).write(to: URL(fileURLWithPath: manifest))
            for arguments in [["train", "--config", "hostile.yaml", "--run-dir", "h"],
                              ["train", "--config", "c.yaml", "--run-dir", "h", "--set", "data.train=data/hostile.bin"],
                              ["checkpoint", "verify", "good/checkpoints/step_00000005"],
                              ["eval", "--checkpoint", "good/checkpoints/step_00000005"]] {
                let result = try CLI.run(arguments, in: workspace.url)
                XCTAssertTrue(result.status == 0 || result.status == 1, "\(arguments) trial \(trial): status \(result.status) \(result.stderr)")
                if result.status != 0 {
                    XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, "\(arguments): \(result.stderr)")
                }
            }
        }
    }
}
