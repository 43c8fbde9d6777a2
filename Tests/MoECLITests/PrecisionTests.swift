import Foundation
import XCTest
import MoEIO
import MoECore

/// `train.precision` through the `moe` command a user types.
final class PrecisionTests: XCTestCase {
    /// oneDNN capped below bf16 (`DNNL_MAX_CPU_ISA`) stands in for a CPU without it: auto falls
    /// back to fp32 and says why; an explicit bf16 is a one-line error naming the feature.
    func testWithoutBF16AutoFallsBackAndExplicitBF16IsAnError() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        let capped = ["DNNL_MAX_CPU_ISA": "AVX512_CORE"]
        let auto = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "auto", "--set", "train.steps=2"],
                               in: workspace.url, environment: capped)
        XCTAssertEqual(auto.status, 0, auto.stderr)
        // avx512_core, or the CPU's own set where it is below the cap (AVX2 on AMD Zen 3).
        let isa = BFloat16Support.current.isa.hasPrefix("avx512") ? "avx512_core" : BFloat16Support.current.isa
        XCTAssertTrue(auto.stdout.contains("precision auto -> fp32 (no bf16 products on this CPU: oneDNN's instruction set is \(isa))"),
                      auto.stdout)
        let explicit = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "bf16", "--set", "train.steps=2",
                                    "--set", "train.precision=bf16"], in: workspace.url, environment: capped)
        XCTAssertEqual(explicit.status, 1)
        XCTAssertEqual(explicit.stderr.split(separator: "\n").count, 1, explicit.stderr)
        XCTAssertTrue(explicit.stderr.contains("train.precision: bf16 needs the CPU feature AVX512-BF16"), explicit.stderr)
        // Uncapped, auto decides by the measured speeds and says so.
        let uncapped = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "uncapped", "--set", "train.steps=2"],
                                   in: workspace.url)
        XCTAssertEqual(uncapped.status, 0, uncapped.stderr)
        XCTAssertTrue(uncapped.stdout.contains("precision auto -> "), uncapped.stdout)
    }

    /// The step profile names its parts and they add up to the step: each second counted once
    /// (on 2 ranks, so the waiting probe and the overlapped all-reduce run too; fp32 runs on any CPU).
    func testBenchProfileAddsUpToTheStep() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        // Wide enough that the output projection takes well over the parts' rounding.
        let result = try CLI.mpirun(ranks: 2, ["bench", "--config", "tiny.yaml", "--steps", "3", "--warmup", "1", "--precision", "fp32",
                                               "--set", "model.width=128", "--set", "model.context=64", "--set", "train.batch_size=8"],
                                    in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], result.stdout)
        let parts = try XCTUnwrap(object["step_ms_by_part"] as? [String: Double], result.stdout)
        XCTAssertEqual(Set(parts.keys), ["attention", "route", "plan", "dispatch", "experts", "combine", "output", "all_reduce",
                                         "optimizer", "waiting", "other"], "the parts by name")
        let step = try XCTUnwrap(object["step_ms"] as? Double)
        // Each part is rounded to 0.1 ms and `other` is the rest of the step (never below 0);
        // step_ms is the timed loop's wall time, which holds the benchmark's own work between
        // steps as well (1 ms in a debug build): 1% of slack.
        XCTAssertEqual(parts.values.reduce(0, +), step, accuracy: max(0.6, 0.01 * step), "parts \(parts) in a step of \(step) ms")
        XCTAssertGreaterThan(parts["output"] ?? 0, 0.6, "the output projection is timed, apart from `other`")
        // The work between the products: every part but attention, the experts and waiting.
        let outside = try XCTUnwrap(object["outside_attention_experts_ms"] as? Double)
        let named = parts.filter { !["attention", "experts", "waiting"].contains($0.key) }.values.reduce(0, +)
        XCTAssertEqual(outside, named, accuracy: max(0.6, 0.01 * step), "outside attention and experts in \(parts)")
        XCTAssertEqual(try XCTUnwrap(object["outside_attention_experts_share"] as? Double), outside / step, accuracy: 0.002)
        let places = try XCTUnwrap(object["waiting_ms_by_place"] as? [String: Double])
        XCTAssertEqual(places.values.reduce(0, +), try XCTUnwrap(parts["waiting"]), accuracy: 0.16)
    }

    /// One rank has no transfers in flight: its exchanges complete as they start, so its
    /// communication time is what the starts took, not the span until the layer next looks at a
    /// transfer (the experts' backward, for the routing weights' gradients).
    func testOneRankCountsNoTransferInFlight() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        let result = try CLI.run(["bench", "--config", "tiny.yaml", "--steps", "3", "--warmup", "1", "--precision", "fp32",
                                  "--set", "model.width=128", "--set", "model.context=64", "--set", "train.batch_size=8"],
                                 in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], result.stdout)
        let communication = try XCTUnwrap(object["communication_ms"] as? [String: Double], result.stdout)
        let parts = try XCTUnwrap(object["step_ms_by_part"] as? [String: Double], result.stdout)
        XCTAssertLessThan(communication["total"] ?? .infinity, 0.1 * (parts["experts"] ?? 0), "\(communication), \(parts)")
    }

    /// On 2 ranks, so the profile's barrier timing (the WaitingProbe hook, bench only) runs too.
    func testBenchPrintsOneJSONObjectForBothPrecisions() throws {
        try Self.requireBF16()
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        let result = try CLI.mpirun(ranks: 2, ["bench", "--config", "tiny.yaml", "--steps", "2", "--warmup", "1", "--precision", "both"],
                                    in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let lines = result.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, result.stdout)
        let line = try XCTUnwrap(lines.first, result.stderr)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], result.stdout)
        let speedup = try XCTUnwrap(object["bf16_speedup"] as? Double)
        XCTAssertGreaterThan(speedup, 0)
        for precision in ["fp32", "bf16"] {
            let run = try XCTUnwrap(object[precision] as? [String: Any], "\(precision) missing")
            XCTAssertEqual(run["precision"] as? String, precision)
            for key in ["tokens_per_sec", "mfu", "fp32_peak_gflops", "bf16_peak_gflops", "step_ms", "peak_rss_mib"] {
                XCTAssertGreaterThan(run[key] as? Double ?? 0, 0, "\(precision).\(key)")
            }
            let parts = try XCTUnwrap(run["step_ms_by_part"] as? [String: Any])
            XCTAssertEqual(Set(parts.keys), ["attention", "route", "plan", "dispatch", "experts", "combine", "output", "all_reduce",
                                             "optimizer", "waiting", "other"], "the MoE stages by name")
            // The waiting part, split by where it was: the three places add up to it (each
            // rounded to 0.1 ms).
            let places = try XCTUnwrap(run["waiting_ms_by_place"] as? [String: Double])
            XCTAssertEqual(Set(places.keys), ["forward_exchanges", "backward_exchanges", "gradient_sync"])
            XCTAssertEqual(places.values.reduce(0, +), try XCTUnwrap(parts["waiting"] as? Double), accuracy: 0.16)
        }
        let bad = try CLI.run(["bench", "--precision", "fp16"], in: workspace.url)
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("--precision 'fp16'"), bad.stderr)
    }

    /// configs/bench.yaml for 300 steps in fp32 and in bf16 on the same data: the bf16 loss stays
    /// close to the fp32 loss at every logged step after step 50. Both runs are deterministic
    /// (same binary, data and seed), but the figure is not a stable property of the code: any
    /// change in the float order of any product sends both trajectories elsewhere. Measured on
    /// this generated corpus across versions of the code: 1.01%, 1.23%, and 1.92% once experts
    /// that receive a single row went through sgemv instead of sgemm (Shakespeare: 0.98%,
    /// docs/PERFORMANCE.md). The bound, 3%, sits above that spread and far below what a wrong bf16 product
    /// does (a broken attention gradient: tens of percent). For scale: fp32 on 1 rank vs 2
    /// ranks, which differ only in summation order, drift 0.24% apart on Shakespeare by step 300. Needs the release binary
    /// (the debug build runs this model at ~60 tokens/s): launch/test.sh builds it and passes
    /// its path in MOE_RELEASE_BINARY. Without it the test is skipped, except in CI, where it fails.
    func testBenchConfigTrainsTheSameInBF16AsInFP32() throws {
        try Self.requireBF16()
        guard let path = ProcessInfo.processInfo.environment["MOE_RELEASE_BINARY"] else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { throw CIFailure("MOE_RELEASE_BINARY is not set; run launch/test.sh") }
            throw XCTSkip("set MOE_RELEASE_BINARY to a release build of moe (launch/test.sh does)")
        }
        let binary = URL(fileURLWithPath: path)
        let workspace = try Workspace()
        try TokenFile.write(tokens: Self.englishLikeText(bytes: 2_000_000), vocabularySize: 256, to: workspace.path("data/corpus.bin"))
        let config = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("configs/bench.yaml").path
        var losses: [String: [Int: Double]] = [:]
        for precision in ["fp32", "bf16"] {
            let arguments = ["train", "--config", config, "--run-dir", precision, "--set", "train.precision=\(precision)",
                             "--set", "data.train=data/corpus.bin", "--set", "data.val=", "--set", "train.eval_every=0"]
            let result = try CLI.mpirun(ranks: 2, arguments, in: workspace.url, timeout: 900, executable: binary)
            XCTAssertEqual(result.status, 0, result.stderr)
            let metrics = try readMetrics(workspace.path("\(precision)/metrics.jsonl"))
            losses[precision] = Dictionary(uniqueKeysWithValues: metrics.compactMap { record in record.loss.map { (record.step, $0) } })
        }
        let fp32 = try XCTUnwrap(losses["fp32"]), bf16 = try XCTUnwrap(losses["bf16"])
        XCTAssertEqual(fp32.count, 31, "a metrics line every 10 of 300 steps, and the last")
        var worst = 0.0
        for (step, reference) in fp32 where step > 50 {
            let loss = try XCTUnwrap(bf16[step], "bf16 has no loss at step \(step)")
            worst = max(worst, abs(loss - reference) / reference)
            XCTAssertEqual(loss, reference, accuracy: 0.03 * reference, "step \(step)")
        }
        XCTAssertNotEqual(fp32[290], bf16[290], "identical losses: bf16 did not run")
        print("bench.yaml, 300 steps: largest relative loss difference bf16 vs fp32 after step 50: \(worst)")
    }

    /// Skips on a CPU whose oneDNN has no bf16 products (AMD Zen 3, say: AVX2), where an explicit
    /// bf16 run is the one-line error the first test checks.
    static func requireBF16() throws {
        let support = BFloat16Support.current
        guard support.supported else { throw XCTSkip("this CPU has no bf16 products (oneDNN's instruction set is \(support.isa))") }
    }

    /// Text with about the byte-level entropy of English, so losses are of Shakespeare's size
    /// (~2.4 nats at 300 steps) rather than the workspace corpus's ~0.5, where every relative
    /// comparison is magnified: 3000 pseudo-words spelled with English letter frequencies,
    /// drawn by Zipf's law, in capitalised sentences under speaker names.
    static func englishLikeText(bytes: Int) -> [UInt16] {
        var state: UInt64 = 0x2545_F491_4F6C_DD1D
        func uniform() -> Double {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return Double(state >> 11) / Double(1 << 53)
        }
        func pick(cumulative: [Double]) -> Int {
            let draw = uniform() * cumulative.last!
            var low = 0, high = cumulative.count - 1
            while low < high { let middle = (low + high) / 2; if cumulative[middle] < draw { low = middle + 1 } else { high = middle } }
            return low
        }
        let letters = Array("etaoinshrdlcumwfgypbvkjxqz".utf8)
        let letterWeights: [Double] = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                                       1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
        let letterCumulative = letterWeights.reduce(into: [Double]()) { $0.append(($0.last ?? 0) + $1) }
        let words: [[UInt8]] = (0..<3000).map { _ in (0..<(2 + Int(uniform() * 8))).map { _ in letters[pick(cumulative: letterCumulative)] } }
        let wordCumulative = (1...words.count).reduce(into: [Double]()) { $0.append(($0.last ?? 0) + 1 / Double($1)) }
        let speakers = (0..<12).map { words[$0 * 7 + 50].map { $0 - 32 } }   // upper case
        var text: [UInt8] = []
        text.reserveCapacity(bytes + 200)
        while text.count < bytes {
            text += speakers[Int(uniform() * Double(speakers.count))] + Array(".\n".utf8)
            for sentence in 0..<(1 + Int(uniform() * 3)) {
                for index in 0..<(4 + Int(uniform() * 10)) {
                    var word = words[pick(cumulative: wordCumulative)]
                    if index == 0 { word[0] -= 32 } else { text.append(32) }
                    text += word
                }
                text += Array((uniform() < 0.8 ? "." : uniform() < 0.5 ? "!" : "?").utf8)
                text.append(sentence == 0 ? 32 : 10)
            }
            text.append(10)
        }
        return text.prefix(bytes).map(UInt16.init)
    }
}
