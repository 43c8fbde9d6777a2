import Foundation
import XCTest
import MoEIO
import MoECore

/// End-to-end runs of the `moe` executable on the tiny model.
final class TrainingRunTests: XCTestCase {
    func losses(_ metrics: [MetricsRecord]) -> [Int: Double] {
        var losses: [Int: Double] = [:]
        for object in metrics { if let loss = object.loss { losses[object.step] = loss } }
        return losses
    }

    func testTrainWritesTheContractThenEvalGenerateAndVerifyWork() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        let train = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "run"], in: workspace.url)
        XCTAssertEqual(train.status, 0, train.stderr)
        XCTAssertTrue(train.stdout.contains("step 11/12"), train.stdout)

        // metrics.jsonl: every contracted key on every logged step, validation records at 0, 6, 12.
        let metrics = try readMetrics(workspace.path("run/metrics.jsonl"))
        let stepRecords = metrics.filter(\.isTrainingStep)
        XCTAssertEqual(stepRecords.map(\.step), Array(0..<12))
        for record in stepRecords {
            let fields: [(String, Any?)] = [("loss", record.loss), ("lr", record.learningRate), ("tokens_per_sec", record.tokensPerSecond),
                                            ("aux_loss", record.auxiliaryLoss), ("dropped_fraction", record.droppedFraction),
                                            ("active_experts", record.activeExperts), ("grad_norm", record.gradientNorm), ("phase", record.phase)]
            for (key, value) in fields { XCTAssertNotNil(value, "metrics record lacks \(key): \(record)") }
            let load = try XCTUnwrap(record.expertLoad)
            XCTAssertEqual(load.count, 2, "one row per MoE layer")
            for row in load {
                XCTAssertEqual(row.count, 4)
                XCTAssertEqual(row.reduce(0, +), 1, accuracy: 1e-9)
            }
            let active = try XCTUnwrap(record.activeExperts)
            XCTAssertTrue(active > 1 && active <= 2, "top-2 with capacity keeps between 1 and 2 experts per token: \(active)")
        }
        let validation = metrics.filter { $0.validationLoss != nil }
        XCTAssertEqual(validation.map(\.step), [0, 6, 12])
        let firstLoss = try XCTUnwrap(stepRecords.first?.loss)
        let lastLoss = try XCTUnwrap(stepRecords.last?.loss)
        XCTAssertEqual(firstLoss, log(256), accuracy: 0.3, "an untrained byte model is near uniform")
        XCTAssertLessThan(lastLoss, firstLoss - 1, "12 steps at lr 1e-2 must learn the repetitive text")

        // The resolved config is written and loads back to the same values.
        let resolved = try RunConfig.load(file: workspace.path("run/config.yaml"))
        XCTAssertEqual(resolved.model.vocabularySize, 256)
        XCTAssertEqual(resolved.train.steps, 12)

        // Checkpoints: the last `keep` (2) complete ones, each with DONE.
        let checkpoints = try FileManager.default.contentsOfDirectory(atPath: workspace.path("run/checkpoints")).sorted()
        XCTAssertEqual(checkpoints, ["step_00000006", "step_00000012"])
        for name in ["DONE", "manifest.json", "replicated.safetensors", "experts-rank-00000.safetensors"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("run/checkpoints/step_00000012/\(name)")), name)
        }

        // eval reproduces the final validation loss of the run (same windows, same weights).
        let evaluation = try CLI.run(["eval", "--checkpoint", "run"], in: workspace.url)
        XCTAssertEqual(evaluation.status, 0, evaluation.stderr)
        let finalValidation = try XCTUnwrap(validation.last?.validationLoss)
        XCTAssertTrue(evaluation.stdout.contains(String(format: "val_loss %.4f", finalValidation)), evaluation.stdout)

        let verify = try CLI.run(["checkpoint", "verify", "run/checkpoints/step_00000012"], in: workspace.url)
        XCTAssertEqual(verify.status, 0, verify.stderr)
        let inspect = try CLI.run(["checkpoint", "inspect", "run"], in: workspace.url)
        XCTAssertEqual(inspect.status, 0, inspect.stderr)
        XCTAssertTrue(inspect.stdout.contains("step 12"), inspect.stdout)

        // generate: a seed reproduces a sample; another seed gives another.
        let arguments = ["generate", "--checkpoint", "run", "--prompt", "ROMEO.\n", "--tokens", "60", "--temperature", "1"]
        let first = try CLI.run(arguments + ["--seed", "7"], in: workspace.url)
        let again = try CLI.run(arguments + ["--seed", "7"], in: workspace.url)
        let other = try CLI.run(arguments + ["--seed", "8"], in: workspace.url)
        XCTAssertEqual(first.status, 0, first.stderr)
        XCTAssertTrue(first.stdout.hasPrefix("ROMEO.\n"))
        XCTAssertEqual(first.stdout, again.stdout)
        XCTAssertNotEqual(first.stdout, other.stdout)

        // The run report and the comparison table read metrics.jsonl.
        let report = try CLI.run(["report", "run"], in: workspace.url)
        XCTAssertEqual(report.status, 0, report.stderr)
        let html = try String(contentsOfFile: workspace.path("run/report.html"), encoding: .utf8)
        for part in ["<svg", "Expert load, MoE layer 0", "Expert load, MoE layer 1", "Loss", "Throughput", "gate: topk"] {
            XCTAssertTrue(html.contains(part), "report lacks \(part)")
        }
        XCTAssertFalse(html.contains("<script"), "the report is static")
        let compare = try CLI.run(["compare", "run", "--output", "cmp"], in: workspace.url)
        XCTAssertEqual(compare.status, 0, compare.stderr)
        XCTAssertTrue(compare.stdout.contains("| run | seeds | steps | compute (TFLOP) | final val loss"), compare.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: workspace.path("cmp/validation.svg")))

        // A flipped byte in a checkpoint file is caught by verify.
        let path = workspace.path("run/checkpoints/step_00000012/replicated.safetensors")
        var bytes = try XCTUnwrap(FileManager.default.contents(atPath: path))
        bytes[bytes.count - 3] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: path))
        let broken = try CLI.run(["checkpoint", "verify", "run/checkpoints/step_00000012"], in: workspace.url)
        XCTAssertNotEqual(broken.status, 0)
        XCTAssertTrue(broken.stderr.contains("replicated.safetensors") && broken.stderr.contains("SHA-256"), broken.stderr)
    }

    func testFixedSeedReproducesTheRunAndAnotherSeedDoesNot() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig)
        for (directory, seed) in [("a", 5), ("b", 5), ("c", 6)] {
            let result = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", directory, "--set", "train.seed=\(seed)",
                                      "--set", "train.steps=6"], in: workspace.url)
            XCTAssertEqual(result.status, 0, result.stderr)
        }
        let a = losses(try readMetrics(workspace.path("a/metrics.jsonl")))
        let b = losses(try readMetrics(workspace.path("b/metrics.jsonl")))
        let c = losses(try readMetrics(workspace.path("c/metrics.jsonl")))
        XCTAssertEqual(a.count, 6)
        XCTAssertEqual(a, b, "same seed, same losses bit for bit")
        XCTAssertNotEqual(a[5], c[5])

        // Runs that differ only in the seed are one comparison row: mean ± sd over them, checked
        // against the two final validation losses; another setting is another row.
        let other = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "d/seed1", "--set", "train.steps=4"], in: workspace.url)
        XCTAssertEqual(other.status, 0, other.stderr)
        let compare = try CLI.run(["compare", "a", "c", "d/seed1", "--output", "cmp"], in: workspace.url)
        XCTAssertEqual(compare.status, 0, compare.stderr)
        let finals = try ["a", "c"].map { try XCTUnwrap(readMetrics(workspace.path("\($0)/metrics.jsonl")).last?.validationLoss) }
        let mean = (finals[0] + finals[1]) / 2, sd = abs(finals[0] - finals[1]) / 2.squareRoot()
        let rows = compare.stdout.split(separator: "\n").filter { $0.hasPrefix("| a ") || $0.hasPrefix("| d ") }
        XCTAssertEqual(rows.count, 2, compare.stdout)
        XCTAssertTrue(rows[0].hasPrefix("| a | 2 | 6 | ") && rows[0].contains(String(format: "| %.4f ± %.4f |", mean, sd)), compare.stdout)
        XCTAssertTrue(rows[1].hasPrefix("| d | 1 | 4 | "), compare.stdout)
        for chart in ["validation.svg", "validation-by-compute.svg"] {
            XCTAssertTrue(try String(contentsOfFile: workspace.path("cmp/\(chart)"), encoding: .utf8).contains("<polyline"), chart)
        }
    }

    /// In every precision: auto (whatever it measures to), fp32, and bf16 where the CPU has it.
    func testStopAndResumeContinuesExactly() throws {
        for precision in ["auto", "fp32"] + (BFloat16Support.current.supported ? ["bf16"] : []) {
            try stopAndResume(precision: precision)
        }
    }

    func stopAndResume(precision: String) throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig.replacingOccurrences(of: "eval_batches: 2}",
                                                                          with: "eval_batches: 2, precision: \(precision)}"))
        let straight = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "straight"], in: workspace.url)
        XCTAssertEqual(straight.status, 0, straight.stderr)
        let stopped = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "resumed", "--stop-at", "5"], in: workspace.url)
        XCTAssertEqual(stopped.status, 0, stopped.stderr)
        // A fresh run must not silently overwrite a run directory that has checkpoints.
        let clobber = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "resumed"], in: workspace.url)
        XCTAssertNotEqual(clobber.status, 0)
        XCTAssertTrue(clobber.stderr.contains("--resume"), clobber.stderr)
        // The architecture comes from the checkpoint; a conflicting one is named.
        let conflict = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "resumed", "--resume", "--set", "model.width=32",
                                    "--set", "moe.experts=2"], in: workspace.url)
        XCTAssertNotEqual(conflict.status, 0)
        XCTAssertTrue(conflict.stderr.contains("model.width") && conflict.stderr.contains("moe.experts"), conflict.stderr)

        let resumed = try CLI.run(["train", "--config", "tiny.yaml", "--run-dir", "resumed", "--resume"], in: workspace.url)
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertTrue(resumed.stdout.contains("resumed from"), resumed.stdout)
        let expected = losses(try readMetrics(workspace.path("straight/metrics.jsonl")))
        let actual = losses(try readMetrics(workspace.path("resumed/metrics.jsonl")))
        XCTAssertEqual(actual.count, 12)
        XCTAssertEqual(actual, expected, "losses after resume equal the straight run's bit for bit")
        let final = "checkpoints/step_00000012/"
        for file in ["replicated.safetensors", "experts-rank-00000.safetensors"] {
            XCTAssertEqual(FileManager.default.contents(atPath: workspace.path("straight/" + final + file)),
                           FileManager.default.contents(atPath: workspace.path("resumed/" + final + file)), "\(file) differs")
        }
    }

    /// launch/compare-gates.sh on the tiny model: each baseline trains again for the steps that
    /// spend EvoMoE's mean compute (within half a step of it), the tables have one mean ± sd row
    /// per gate, a second invocation keeps the finished runs, and an unknown gate is named.
    func testCompareGatesScriptMatchesTheBaselinesToEvoMoEsCompute() throws {
        let workspace = try Workspace()
        try workspace.write("tiny.yaml", Workspace.tinyConfig.replacingOccurrences(of: "data/", with: workspace.path("data") + "/"))
        func study(_ gates: String) throws -> CommandResult {
            try CLI.launchScript("compare-gates.sh", in: workspace.url, environment: [
                "CONFIG": workspace.path("tiny.yaml"), "OUT": workspace.path("study"),
                "STEPS": "20", "SEEDS": "2", "JOBS": "2", "GATES": gates, "PRECISION": "fp32",
            ])
        }
        let unknown = try study("hash bogus")
        XCTAssertEqual(unknown.status, 1)
        XCTAssertTrue(unknown.stderr.contains("unknown gate 'bogus'"), unknown.stderr)

        let result = try study("hash dense")
        XCTAssertEqual(result.status, 0, result.stderr)
        func finalCompute(_ run: String) throws -> Double {
            try XCTUnwrap(readMetrics(workspace.path("study/\(run)/metrics.jsonl")).last?.trainingFlops, run)
        }
        let budget = (try finalCompute("steps/evomoe/seed1") + finalCompute("steps/evomoe/seed2")) / 2
        let equalCompute = try String(contentsOfFile: workspace.path("study/equal-compute.md"), encoding: .utf8)
        for gate in ["hash", "dense"] {
            let perStep = try finalCompute("steps/\(gate)/seed1") / 20
            XCTAssertLessThan(perStep * 20, budget, "\(gate) is cheaper per step than EvoMoE's soft phase")
            for seed in [1, 2] {
                XCTAssertEqual(try finalCompute("compute/\(gate)/seed\(seed)"), budget, accuracy: perStep / 2 + 1, "\(gate) seed \(seed)")
            }
            let steps = Int((budget / perStep).rounded())
            XCTAssertTrue(equalCompute.contains("| \(gate) | 2 | \(steps) | "), equalCompute)
        }
        let equalSteps = try String(contentsOfFile: workspace.path("study/equal-steps.md"), encoding: .utf8)
        for gate in ["evomoe", "hash", "dense"] {
            XCTAssertTrue(equalSteps.contains("| \(gate) | 2 | 20 | ") && equalCompute.contains("| \(gate) | 2 | "), equalSteps)
        }
        XCTAssertTrue(equalSteps.contains(" ± "), equalSteps)
        // The dense model has no MoE statistics: its load CV, dropped and experts/token cells are "-".
        let denseRow = try XCTUnwrap(equalSteps.split(separator: "\n").first { $0.hasPrefix("| dense |") })
        XCTAssertTrue(denseRow.hasSuffix("| - | - | - |"), String(denseRow))
        let hashRow = try XCTUnwrap(equalSteps.split(separator: "\n").first { $0.hasPrefix("| hash |") })
        XCTAssertFalse(hashRow.contains("| - |"), String(hashRow))

        let again = try study("hash dense")
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertFalse(again.stdout.contains("val_loss"), "finished runs are kept: \(again.stdout)")
    }
}
