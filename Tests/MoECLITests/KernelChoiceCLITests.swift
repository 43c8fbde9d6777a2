import Foundation
import XCTest

/// The products' kernel and precision through the `moe` command: chosen by measurement at start,
/// logged on one line, cached per machine; MFU against the machine's best kernel. Bench-sized
/// products, so the release binary where launch/test.sh provides it.
final class KernelChoiceCLITests: XCTestCase {
    /// configs/bench.yaml's widths (the shapes where kernel speed is meaningful), a few steps.
    static let benchSizedConfig = """
        model: {context: 128, width: 256, layers: 1, heads: 4, ffn_hidden: 512, moe_every: 1}
        moe: {experts: 8, top_k: 2, gate: topk, capacity_factor: 1.25}
        train: {steps: 2, batch_size: 8, log_every: 1, eval_every: 0, eval_batches: 1}
        data: {train: data/train.bin, val: data/val.bin}
        checkpoint: {every: 0, keep: 1}
        evomoe: {spawn_fraction: 0}
        """

    func makeWorkspace() throws -> Workspace {
        let workspace = try Workspace()
        try workspace.write("bench-sized.yaml", Self.benchSizedConfig)
        return workspace
    }

    /// OpenBLAS on its generic Prescott (SSE3) kernels, as its detection gives on a CPU it does
    /// not know (forced here with the variable): the fp32 products still run fast, on oneDNN,
    /// and the run says which kernels it measured and chose.
    func testGenericOpenBLASCoreMovesTheProductsToOneDNN() throws {
        let workspace = try makeWorkspace()
        let environment = ["OPENBLAS_CORETYPE": "Prescott", "MOE_KERNEL_CACHE": workspace.path("kernels.json")]
        let run = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "run", "--set", "train.precision=fp32"],
                              in: workspace.url, environment: environment, executable: CLI.fastExecutable)
        XCTAssertEqual(run.status, 0, run.stderr)
        let line = try XCTUnwrap(run.stdout.split(separator: "\n").first { $0.hasPrefix("products: ") }, run.stdout)
        XCTAssertTrue(line.hasPrefix("products: fp32 on oneDNN; precision fp32 as configured"), String(line))
        XCTAssertTrue(line.contains("OpenBLAS (Prescott) fp32"), String(line))
        XCTAssertTrue(run.stdout.contains("warning: OPENBLAS_CORETYPE=Prescott is set"), run.stdout)
    }

    /// One process (no mpirun) has the cores to itself: oneDNN's threads take them, pinned one per
    /// core, and OpenBLAS runs on one thread (both on a thread per core, their idle threads spun
    /// against each other: 6,223 against 11,369 tokens/s on 2 cores). The kernels are measured on
    /// those threads, not on one (one thread's figures chose OpenBLAS on AMD Zen 3, whose threads
    /// then fought oneDNN's: 2,174 against 6,024 tokens/s). A user's variables are kept.
    func testOneProcessGivesTheCoresToTheProducts() throws {
        let workspace = try makeWorkspace()
        let cores = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        let environment = ["MOE_KERNEL_CACHE": workspace.path("kernels.json")]
        let run = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "default"], in: workspace.url,
                              environment: environment, executable: CLI.fastExecutable)
        XCTAssertEqual(run.status, 0, run.stderr)
        let line = try XCTUnwrap(run.stdout.split(separator: "\n").first { $0.hasPrefix("OpenBLAS core ") }, run.stdout)
        XCTAssertTrue(line.contains(", 1 thread(s) per rank; oneDNN "), String(line))
        if cores >= 2 { XCTAssertTrue(line.contains(", \(cores) thread(s) per rank pinned one per core"), String(line)) }
        let products = try XCTUnwrap(run.stdout.split(separator: "\n").first { $0.hasPrefix("products: ") }, run.stdout)
        XCTAssertEqual(products.contains("GFLOP/s per rank on \(cores) threads: "), cores >= 2, String(products))
        let cached = try String(contentsOfFile: workspace.path("kernels.json"), encoding: .utf8)
        XCTAssertEqual(cached.contains("|\(cores) threads"), cores >= 2, cached)
        let chosen = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "chosen"], in: workspace.url,
                                 environment: environment.merging(["OPENBLAS_NUM_THREADS": "2", "OMP_PROC_BIND": "false"]) { $1 },
                                 executable: CLI.fastExecutable)
        XCTAssertEqual(chosen.status, 0, chosen.stderr)
        let kept = try XCTUnwrap(chosen.stdout.split(separator: "\n").first { $0.hasPrefix("OpenBLAS core ") }, chosen.stdout)
        XCTAssertTrue(kept.contains(", 2 thread(s) per rank; oneDNN "), String(kept))
        XCTAssertFalse(kept.contains("pinned"), String(kept))
        // With its threads pinned a one-process run also splits the optimizer's pass over them
        // (BLASInfo.splitElementwise); unpinned it does not: the same numbers either way.
        guard cores >= 2 else { return }
        let unsplit = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "unsplit", "--set", "train.steps=4"], in: workspace.url,
                                  environment: environment.merging(["OMP_PROC_BIND": "false"]) { $1 }, executable: CLI.fastExecutable)
        XCTAssertEqual(unsplit.status, 0, unsplit.stderr)
        let split = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "split", "--set", "train.steps=4"], in: workspace.url,
                                environment: environment, executable: CLI.fastExecutable)
        XCTAssertEqual(split.status, 0, split.stderr)
        func trajectory(_ run: String) throws -> [[Double?]] {
            try readMetrics(workspace.path("\(run)/metrics.jsonl")).filter { $0.loss != nil }.map { [$0.loss, $0.gradientNorm] }
        }
        XCTAssertEqual(try trajectory("split").count, 4)
        XCTAssertEqual(try trajectory("split"), try trajectory("unsplit"))
    }

    /// `precision: auto` follows the measurement: the cached figures are rewritten to make bf16
    /// half as fast, then three times as fast, as fp32 (where the CPU has bf16 at all).
    func testAutoPrecisionFollowsTheMeasurement() throws {
        let workspace = try makeWorkspace()
        let cache = workspace.path("kernels.json")
        let environment = ["MOE_KERNEL_CACHE": cache]
        let first = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "measured"], in: workspace.url, environment: environment, executable: CLI.fastExecutable)
        XCTAssertEqual(first.status, 0, first.stderr)
        XCTAssertTrue(first.stdout.contains("(measured)"), first.stdout)
        var entries = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: cache))) as? [String: [String: Double]])
        XCTAssertEqual(entries.count, 1)
        let key = entries.keys.first!
        guard entries[key]!["onednn_bf16"] != nil else { throw XCTSkip("this CPU has no bf16 products: only the fp32 outcome exists") }
        func run(bf16Ratio: Double) throws -> String {
            let fp32 = max(entries[key]!["openblas_fp32"]!, entries[key]!["onednn_fp32"]!)
            entries[key]!["onednn_bf16"] = bf16Ratio * fp32
            try JSONSerialization.data(withJSONObject: entries).write(to: URL(fileURLWithPath: cache))
            let result = try CLI.run(["train", "--config", "bench-sized.yaml", "--run-dir", "ratio-\(bf16Ratio)"],
                                     in: workspace.url, environment: environment, executable: CLI.fastExecutable)
            XCTAssertEqual(result.status, 0, result.stderr)
            return result.stdout
        }
        let slower = try run(bf16Ratio: 0.5)
        XCTAssertTrue(slower.contains("precision auto -> fp32 (bf16 only 0.50x fp32"), slower)
        XCTAssertTrue(slower.contains("(cached in \(cache))"), slower)
        let faster = try run(bf16Ratio: 3)
        XCTAssertTrue(faster.contains("products: bf16 on oneDNN; precision auto -> bf16 (3.00x fp32"), faster)
    }

    /// MFU's denominator is the best fp32 kernel of the machine, not the one trained with: with
    /// OpenBLAS forced onto its generic kernels and chosen by hand, MFU is against oneDNN's peak
    /// and the bench warns.
    func testBenchMFUIsAgainstTheBestKernel() throws {
        let workspace = try makeWorkspace()
        let environment = ["OPENBLAS_CORETYPE": "Prescott", "MOE_KERNEL_CACHE": workspace.path("kernels.json")]
        let result = try CLI.run(["bench", "--config", "bench-sized.yaml", "--steps", "2", "--warmup", "1", "--precision", "fp32",
                                  "--set", "train.kernel=openblas"], in: workspace.url, environment: environment, executable: CLI.fastExecutable)
        XCTAssertEqual(result.status, 0, result.stderr)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], result.stdout)
        let peaks = try XCTUnwrap(object["peak_gflops_by_kernel"] as? [String: Double])
        let openBLAS = try XCTUnwrap(peaks["openblas_fp32"]), oneDNN = try XCTUnwrap(peaks["onednn_fp32"])
        XCTAssertEqual((object["kernels"] as? [String: String])?["matrix_products"], "openblas_fp32")
        XCTAssertEqual(object["fp32_peak_gflops"] as? Double, max(openBLAS, oneDNN))
        let achieved = try XCTUnwrap(object["achieved_gflops"] as? Double), mfu = try XCTUnwrap(object["mfu"] as? Double)
        XCTAssertEqual(mfu, achieved / max(openBLAS, oneDNN), accuracy: 0.002)
        XCTAssertGreaterThan(oneDNN, 1.1 * openBLAS, "oneDNN's fp32 against OpenBLAS's SSE3 kernels")
        let warning = try XCTUnwrap(object["warning"] as? String, result.stdout)
        XCTAssertTrue(warning.contains("openblas_fp32") && warning.contains("below onednn_fp32"), warning)
        XCTAssertTrue(result.stderr.contains(warning), result.stderr)
    }

    /// launch/bench-peer.sh: the same (tiny) model in plain PyTorch and in `moe bench` on 2
    /// ranks, one JSON line with both and their ratio.
    func testBenchPeerPrintsBothAndTheirRatio() throws {
        _ = try CLI.requireMPI()
        try CLI.requirePython("torch", "PyTorch is not installed (launch/test.sh installs it)")
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        let result = try CLI.launchScript("bench-peer.sh", in: workspace.url,
                                          environment: ["CONFIG": workspace.path("tiny.yaml"), "STEPS": "2", "RANKS": "2"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let lines = result.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, result.stdout)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any], result.stdout)
        let swift = try XCTUnwrap(object["swiftmoe"] as? [String: Any]), torch = try XCTUnwrap(object["pytorch"] as? [String: Any])
        let swiftSpeed = try XCTUnwrap(swift["tokens_per_sec"] as? Double), torchSpeed = try XCTUnwrap(torch["tokens_per_sec"] as? Double)
        XCTAssertGreaterThan(swiftSpeed, 0)
        XCTAssertGreaterThan(torch["fp32"] as? Double ?? 0, 0)
        XCTAssertGreaterThan(torch["bf16_autocast"] as? Double ?? 0, 0)
        XCTAssertEqual(torchSpeed, max(torch["fp32"] as! Double, torch["bf16_autocast"] as! Double), "the stronger PyTorch run is the peer")
        XCTAssertEqual(try XCTUnwrap(object["ratio"] as? Double), swiftSpeed / torchSpeed, accuracy: 0.001)
        XCTAssertEqual(object["cores"] as? Int, 2)
        XCTAssertEqual(swift["global_batch_tokens"] as? Int, torch["global_batch_tokens"] as? Int, "the same global batch")
        XCTAssertFalse((object["cpu"] as? String ?? "").isEmpty)
    }
}
