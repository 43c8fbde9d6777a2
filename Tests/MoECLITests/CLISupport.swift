import Foundation
import XCTest
import MoECore
import MoEIO

/// Runs the `moe` executable built next to the test bundle.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

enum CLI {
    /// The built `moe` binary: it lives in the same build folder as the test bundle.
    static var executable: URL {
        // On Linux the test runner's main bundle is the build folder itself; on macOS the
        // .xctest bundle sits inside it.
        let folders = [Bundle.main.bundleURL] + Bundle.allBundles.map(\.bundleURL).filter { $0.pathExtension == "xctest" }
            .map { $0.deletingLastPathComponent() }
        let candidates = folders.map { $0.appendingPathComponent("moe") }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? candidates[0]
    }

    /// The release binary when launch/test.sh provides it (MOE_RELEASE_BINARY), else `executable`:
    /// for tests whose workload the debug build runs slowly.
    static var fastExecutable: URL {
        ProcessInfo.processInfo.environment["MOE_RELEASE_BINARY"].map { URL(fileURLWithPath: $0) } ?? executable
    }

    /// Runs `moe` (or, with `mpirun` ranks, `mpirun -np R moe`) in `directory`.
    @discardableResult
    static func run(_ arguments: [String], in directory: URL, environment: [String: String] = [:],
                    executable: URL = CLI.executable, timeout: Double = defaultTimeout) throws -> CommandResult {
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.currentDirectoryURL = directory
        var env = baseEnvironment
        for (key, value) in environment { env[key] = value }
        process.environment = env
        return try capture(process, timeout: timeout)
    }

    /// Runs the repository's `launch/NAME` with bash, as `run` runs `moe` (a single-rank
    /// environment plus `environment`), with `MOE` set to the binary under test.
    static func launchScript(_ name: String, _ arguments: [String] = [], in directory: URL, environment: [String: String] = [:],
                             timeout: Double = defaultTimeout) throws -> CommandResult {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../launch/\(name)")
        return try run([script.standardized.path] + arguments, in: directory, environment: ["MOE": executable.path].merging(environment) { $1 },
                       executable: URL(fileURLWithPath: "/bin/bash"), timeout: timeout)
    }

    /// `python3 arguments...` (a script path or `-c CODE`, then its arguments).
    static func python(_ arguments: [String], timeout: Double = defaultTimeout) throws -> CommandResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3"] + arguments
        return try capture(process, timeout: timeout)
    }

    /// Skips the calling test with `reason` unless python3 can import `modules` ("a, b").
    static func requirePython(_ modules: String, _ reason: String) throws {
        guard (try? python(["-c", "import \(modules)"]))?.status == 0 else { throw XCTSkip(reason) }
    }

    /// Seconds a subprocess may run before it is killed and the test fails: a hang must fail
    /// the test, never stall CI. (mpirun jobs also carry their own, shorter `--timeout`.)
    static let defaultTimeout = 600.0

    static func capture(_ process: Process, timeout: Double = defaultTimeout,
                        file: StaticString = #filePath, line: UInt = #line) throws -> CommandResult {
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        final class Flag: @unchecked Sendable { var value = false }
        let timedOut = Flag()
        let pid = process.processIdentifier
        let watchdog = DispatchWorkItem { timedOut.value = true; kill(pid, SIGKILL) }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: watchdog)
        defer { watchdog.cancel() }
        // Read both pipes before waiting, or a full pipe blocks the child.
        final class Box: @unchecked Sendable { var data = Data() }
        let errData = Box()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async { errData.data = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        process.waitUntilExit()
        watchdog.cancel()
        if timedOut.value {
            XCTFail("\(process.executableURL?.lastPathComponent ?? "process") \(process.arguments?.joined(separator: " ") ?? "") was killed after \(Int(timeout)) s", file: file, line: line)
        }
        return CommandResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                             stderr: String(decoding: errData.data, as: UTF8.self))
    }
}

/// A scratch directory with small generated token files: text with enough structure to learn.
final class Workspace {
    let url: URL

    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("moe-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: url.appendingPathComponent("data"), withIntermediateDirectories: true)
        try TokenFile.write(tokens: Workspace.text(lines: 400, seed: 1), vocabularySize: 256, to: path("data/train.bin"))
        try TokenFile.write(tokens: Workspace.text(lines: 80, seed: 2), vocabularySize: 256, to: path("data/val.bin"))
    }

    deinit { try? FileManager.default.removeItem(at: url) }

    func path(_ relative: String) -> String { url.appendingPathComponent(relative).path }

    func write(_ relative: String, _ text: String) throws {
        try text.write(toFile: path(relative), atomically: true, encoding: .utf8)
    }

    func write(_ relative: String, bytes: [UInt8]) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path(relative)))
    }

    /// Play-like lines from a small vocabulary, deterministic in `seed`.
    static func text(lines: Int, seed: UInt64) -> [UInt16] {
        let speakers = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
        let words = ["the", "love", "night", "sweet", "and", "my", "lord", "thou", "art", "fair", "day", "O"]
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        func next(_ bound: Int) -> Int {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return Int(state % UInt64(bound))
        }
        var text = ""
        for _ in 0..<lines {
            text += speakers[next(speakers.count)] + ".\n"
            text += (0..<(3 + next(6))).map { _ in words[next(words.count)] }.joined(separator: " ") + ".\n"
        }
        return text.utf8.map(UInt16.init)
    }

    /// The tiny model of configs/tiny.yaml on this workspace's data.
    static let tinyConfig = """
        model: {context: 16, width: 16, layers: 2, heads: 2, ffn_hidden: 32, moe_every: 1}
        moe: {experts: 4, top_k: 2, gate: topk, capacity_factor: 1.25, min_capacity: 2}
        train: {steps: 12, batch_size: 2, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, log_every: 1, eval_every: 6, eval_batches: 2}
        data: {train: data/train.bin, val: data/val.bin}
        checkpoint: {every: 6, keep: 2}
        evomoe: {spawn_fraction: 0}
        """
}

/// Parsed `metrics.jsonl` (the schema is `MetricsRecord`'s).
func readMetrics(_ path: String) throws -> [MetricsRecord] { try MetricsRecord.read(path) }

extension CLI {
    /// The environment every command of the tests runs in: without the variables of an MPI job
    /// the test process may itself run in (each command is one rank unless it launches mpirun),
    /// with one BLAS thread.
    static var baseEnvironment: [String: String] {
        var env = ProcessInfo.processInfo.environment
        for key in env.keys where key.hasPrefix("OMPI_") || key.hasPrefix("PMIX_") { env.removeValue(forKey: key) }
        env["OPENBLAS_NUM_THREADS"] = "1"
        return env
    }

    /// `mpirun -np ranks moe ...` with a timeout (so a hang fails the test instead of CI), made
    /// and not started: for tests that act on the job while it runs.
    static func mpirunProcess(ranks: Int, _ arguments: [String], in directory: URL, transport: [String] = [],
                              timeout: Int = 120, executable: URL = CLI.executable) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try requireMPI())
        process.arguments = ["--allow-run-as-root", "--oversubscribe", "--timeout", "\(timeout)", "-np", "\(ranks)"]
            + transport + [executable.path] + arguments
        process.currentDirectoryURL = directory
        process.environment = baseEnvironment
        return process
    }

    /// `mpirun -np ranks moe ...` run to its end.
    @discardableResult
    static func mpirun(ranks: Int, _ arguments: [String], in directory: URL, transport: [String] = [],
                       timeout: Int = 120, executable: URL = CLI.executable) throws -> CommandResult {
        let process = try mpirunProcess(ranks: ranks, arguments, in: directory, transport: transport, timeout: timeout, executable: executable)
        return try capture(process, timeout: Double(timeout + 30))
    }

    /// `mpirun` on PATH. Missing, it skips the test on a developer's machine but fails it in CI
    /// (CI=true), where launch/test.sh installs it: a silent skip there would hide every MPI test.
    static func requireMPI() throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        if let found = path.split(separator: ":").map({ "\($0)/mpirun" }).first(where: FileManager.default.isExecutableFile) {
            return found
        }
        if ProcessInfo.processInfo.environment["CI"] == "true" {
            throw CIFailure("mpirun is not on PATH (\(path)); launch/install-deps.sh installs openmpi-bin")
        }
        throw XCTSkip("mpirun is not on PATH (launch/install-deps.sh installs it)")
    }
}

struct CIFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
