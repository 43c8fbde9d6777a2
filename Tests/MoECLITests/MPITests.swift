import Foundation
import XCTest
import MoECore

/// The distributed trainer under real `mpirun`: the equivalence invariant over shared memory and
/// over TCP, and failures that end the job instead of hanging it. Every mpirun has a timeout.
final class MPITests: XCTestCase {
    override func setUpWithError() throws {
        _ = try CLI.requireMPI()
    }

    static let config = """
        model: {context: 16, width: 16, layers: 2, heads: 2, ffn_hidden: 32, moe_every: 1}
        moe: {experts: 4, top_k: 2, gate: topk, capacity_factor: 1.25, min_capacity: 2}
        train: {steps: 20, batch_size: 8, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, log_every: 1, eval_every: 10, eval_batches: 2, consistency_check_every: 5, precision: fp32}
        data: {train: data/train.bin, val: data/val.bin}
        checkpoint: {every: 0, keep: 1}
        evomoe: {spawn_fraction: 0}
        """

    struct Run {
        var losses: [Double]
        var validation: [Double]
        var parameters: [String: [Float]]
    }

    /// Trains the 20-step config with a global batch of 8 sequences on `ranks` ranks.
    func train(ranks: Int, experts: Int = 4, transport: [String] = [], in workspace: Workspace, name: String,
               extra: [String] = []) throws -> Run {
        let arguments = ["train", "--config", "mpi.yaml", "--run-dir", name, "--set", "train.batch_size=\(8 / ranks)",
                         "--set", "moe.experts=\(experts)"] + extra
        let result = ranks == 1 ? try CLI.run(arguments, in: workspace.url)
            : try CLI.mpirun(ranks: ranks, arguments, in: workspace.url, transport: transport)
        XCTAssertEqual(result.status, 0, "\(name): \(result.stderr)")
        let metrics = try readMetrics(workspace.path("\(name)/metrics.jsonl"))
        var parameters: [String: [Float]] = [:]
        let checkpoint = workspace.path("\(name)/checkpoints/step_00000020")
        for file in try FileManager.default.contentsOfDirectory(atPath: checkpoint) where file.hasSuffix(".safetensors") {
            let tensors = try Safetensors.File(path: checkpoint + "/" + file)
            for (tensorName, info) in tensors.tensors where !tensorName.hasPrefix("optimizer.") {
                var values = [Float](repeating: 0, count: (info.end - info.begin) / 4)
                try values.withUnsafeMutableBufferPointer { try tensors.read(tensorName, shape: info.shape, into: $0.baseAddress!) }
                XCTAssertNil(parameters[tensorName], "\(tensorName) saved twice")
                parameters[tensorName] = values
            }
        }
        return Run(losses: metrics.compactMap(\.loss), validation: metrics.compactMap(\.validationLoss),
                   parameters: parameters)
    }

    /// Same tolerance argument as the in-process equivalence tests (DistributedTests.swift):
    /// summation order only, ~1e-8 relative in practice.
    func assertEquivalent(_ expected: Run, _ actual: Run, _ label: String) {
        XCTAssertEqual(expected.losses.count, 20, label)
        XCTAssertEqual(actual.losses.count, 20, label)
        for (step, (a, b)) in zip(expected.losses, actual.losses).enumerated() {
            XCTAssertEqual(a, b, accuracy: 1e-4 * abs(a), "\(label): loss at step \(step)")
        }
        for (a, b) in zip(expected.validation, actual.validation) { XCTAssertEqual(a, b, accuracy: 1e-4 * abs(a), "\(label): val_loss") }
        XCTAssertEqual(Set(expected.parameters.keys), Set(actual.parameters.keys), "\(label): parameter names")
        for (name, values) in expected.parameters {
            guard let other = actual.parameters[name] else { continue }
            for (index, (a, b)) in zip(values, other).enumerated() where abs(a - b) > 1e-4 + 1e-3 * abs(a) {
                XCTFail("\(label): \(name)[\(index)] \(a) vs \(b)")
                break
            }
        }
    }

    /// `train.overlap_all_reduce` (the default) sums the replicated gradients in per-block
    /// non-blocking all-reduces during backward: on 2 ranks every sum is a + b however the buffer
    /// is cut, so the run is bitwise the blocking one; on 4 ranks over TCP MPI may order the sums
    /// differently per message size, within the equivalence tolerance.
    func testOverlappedAllReduceMatchesTheBlockingOne() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let tcp = ["--mca", "btl", "tcp,self"]
        let blocking = try train(ranks: 2, transport: tcp, in: workspace, name: "b2", extra: ["--set", "train.overlap_all_reduce=false"])
        let overlapped = try train(ranks: 2, transport: tcp, in: workspace, name: "o2")
        assertBitwiseEqual(blocking, overlapped, "2 ranks, overlapped vs blocking")
        assertEquivalent(try train(ranks: 4, transport: tcp, in: workspace, name: "b4", extra: ["--set", "train.overlap_all_reduce=false"]),
                         try train(ranks: 4, transport: tcp, in: workspace, name: "o4"), "4 ranks, overlapped vs blocking")
    }

    func assertBitwiseEqual(_ expected: Run, _ actual: Run, _ label: String) {
        XCTAssertEqual(expected.losses, actual.losses, label)
        XCTAssertEqual(Set(expected.parameters.keys), Set(actual.parameters.keys), label)
        let differing = expected.parameters.keys.sorted().filter { expected.parameters[$0] != actual.parameters[$0] }
        XCTAssertTrue(differing.isEmpty, "\(label): parameters not bitwise equal after 20 steps: \(differing.prefix(5))")
    }

    /// `train.dispatch_chunks`: the MoE exchanges pipelined over groups of local experts
    /// (non-blocking all-to-alls while the previous group computes) give bitwise the losses and
    /// parameters of one exchange, on 1, 2 and 4 ranks (8 experts: 8, 4 and 2 per rank; 4 and 3
    /// chunks clamp to the local experts).
    func testChunkedDispatchIsBitwiseTheSingleExchange() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let tcp = ["--mca", "btl", "tcp,self"]
        for ranks in [1, 2, 4] {
            let single = try train(ranks: ranks, experts: 8, transport: tcp, in: workspace, name: "c1-\(ranks)")
            for chunks in [3, 4] {
                let chunked = try train(ranks: ranks, experts: 8, transport: tcp, in: workspace, name: "c\(chunks)-\(ranks)",
                                        extra: ["--set", "train.dispatch_chunks=\(chunks)"])
                assertBitwiseEqual(single, chunked, "\(ranks) ranks, \(chunks) chunks")
            }
        }
    }

    func testOneTwoAndFourRanksTrainTheSameModelOverSharedMemoryAndTCP() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let reference = try train(ranks: 1, in: workspace, name: "r1")
        XCTAssertLessThan(reference.losses.last!, reference.losses.first! - 1)
        for (label, transport) in [("shared memory", ["--mca", "btl_vader_single_copy_mechanism", "none"]),
                                   ("tcp", ["--mca", "btl", "tcp,self"])] {
            for ranks in [2, 4] {
                let run = try train(ranks: ranks, transport: transport, in: workspace, name: "r\(ranks)-\(label.first!)")
                assertEquivalent(reference, run, "\(ranks) ranks over \(label)")
            }
        }
    }

    /// Two network stacks on one machine, as two machines: one rank in each of two network
    /// namespaces joined by a veth pair, mpirun's second daemon started by a launch agent that
    /// enters the other namespace (Scripts/two-namespaces.sh), all traffic over real TCP. The
    /// defaults run the overlapped paths: 2 pipelined exchange chunks per direction (2 experts
    /// per rank) and the per-block non-blocking gradient all-reduce.
    func testTwoNetworkNamespacesTrainTheSameModelAsOneRank() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Scripts/two-namespaces.sh")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script.path, workspace.url.path, CLI.executable.path, "train", "--config", "mpi.yaml",
                             "--run-dir", "netns", "--set", "train.batch_size=4"]
        let result = try CLI.capture(process)
        if result.status == 77 { throw XCTSkip("skipped: \(result.stderr)") }
        XCTAssertEqual(result.status, 0, result.stderr)
        let reference = try train(ranks: 1, in: workspace, name: "r1")
        let metrics = try readMetrics(workspace.path("netns/metrics.jsonl"))
        let losses = metrics.compactMap(\.loss)
        XCTAssertEqual(losses.count, 20)
        for (step, (a, b)) in zip(reference.losses, losses).enumerated() {
            XCTAssertEqual(a, b, accuracy: 1e-4 * abs(a), "two namespaces: loss at step \(step)")
        }
    }

    /// launch/bench-network.sh end to end on a tiny model: the shaped link really limits a plain
    /// transfer to about its rate, both benches run, and the JSON line has the promised fields.
    func testBenchNetworkScriptMeasuresOverAShapedLink() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig.replacingOccurrences(of: "data/", with: workspace.path("data") + "/"))
        let result = try CLI.launchScript("bench-network.sh", ["--", "--config", workspace.path("tiny.yaml"), "--warmup", "1", "--precision", "fp32"],
                                          in: workspace.url, environment: ["RATE": "1gbit", "STEPS": "2"], timeout: 300)
        if result.status == 77 { throw XCTSkip("network namespaces are not allowed here: \(result.stderr)") }
        XCTAssertEqual(result.status, 0, result.stderr)
        let line = try XCTUnwrap(result.stdout.split(separator: "\n").last, result.stderr)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], String(line))
        let link = try XCTUnwrap(object["link"] as? [String: Any])
        let measured = try XCTUnwrap(link["measured_gbit_per_s"] as? Double)
        XCTAssertTrue((0.5...1.1).contains(measured), "a 1 Gbit/s link carried \(measured) Gbit/s")
        for side in ["shared_memory", "network"] {
            let bench = try XCTUnwrap(object[side] as? [String: Any], side)
            XCTAssertNotNil(bench["step_ms"] as? Double, side)
            XCTAssertNotNil(bench["tokens_per_sec"] as? Double, side)
            let communication = try XCTUnwrap(bench["communication_ms"] as? [String: Any], side)
            XCTAssertLessThanOrEqual(try XCTUnwrap(communication["exposed"] as? Double), try XCTUnwrap(communication["total"] as? Double) + 1e-9, side)
        }
        XCTAssertNotNil(object["step_ratio"] as? Double)
        let list = Process()
        list.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        list.arguments = ["ip", "netns", "list"]
        XCTAssertFalse(try CLI.capture(list).stdout.split(separator: "\n").contains { $0.hasPrefix("bn") }, "the namespaces are removed")
    }

    func testMoreRanksThanExpertsTrainsTheSameModel() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let reference = try train(ranks: 1, experts: 2, in: workspace, name: "e2r1")
        let run = try train(ranks: 4, experts: 2, in: workspace, name: "e2r4")
        assertEquivalent(reference, run, "4 ranks, 2 experts")
    }

    func testBrokenDispatchCountsEndTheJobWithAnError() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let started = Date()
        let result = try CLI.mpirun(ranks: 2, ["train", "--config", "mpi.yaml", "--run-dir", "bad", "--set", "train.batch_size=4",
                                               "--inject-fault", "dispatch-count@1"], in: workspace.url, timeout: 60)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertNotEqual(result.status, 110, "mpirun's timeout fired: the job hung")
        XCTAssertTrue(result.stderr.contains("MoE dispatch (layer 0)") && result.stderr.contains("disagree with their routing"), result.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(started), 30)
    }

    func testRankCountThatDoesNotFitTheExpertsIsAClearError() throws {
        let workspace = try Workspace()
        try workspace.write("mpi.yaml", Self.config)
        let result = try CLI.mpirun(ranks: 3, ["train", "--config", "mpi.yaml", "--run-dir", "bad"], in: workspace.url, timeout: 60)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertNotEqual(result.status, 110, "mpirun's timeout fired: the job hung")
        XCTAssertTrue(result.stderr.contains("moe.experts (4) and the number of ranks (3) do not fit"), result.stderr)
    }
}
