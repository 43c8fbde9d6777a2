import Foundation
import XCTest
import MoECore

/// `moe export --format hf`: the exported model, loaded with transformers, scores the
/// validation windows as `moe eval` does.
final class ExportTests: XCTestCase {
    /// fp32 products and dropless evaluation, so that the exported model (dropless, PyTorch fp32)
    /// computes what `moe eval` computes.
    static let config = """
        model: {context: 16, width: 16, layers: 2, heads: 2, ffn_hidden: 32, moe_every: 1}
        moe: {experts: 4, top_k: 2, gate: topk, capacity_factor: 1.25, eval_capacity_factor: none, min_capacity: 2}
        train: {steps: 12, batch_size: 2, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, log_every: 4, eval_every: 0, eval_batches: 2, precision: fp32}
        data: {train: data/train.bin, val: data/val.bin}
        checkpoint: {every: 0, keep: 1}
        evomoe: {spawn_fraction: 0}
        """

    /// Skips, saying why, when PyTorch and transformers are missing (launch/test.sh installs them).
    func requireTransformers() throws {
        try CLI.requirePython("torch, transformers, safetensors",
                              "PyTorch and transformers could not be installed here (launch/test.sh tries pip), so the Hugging Face export is not checked")
    }

    /// The exported model's validation loss (computed in PyTorch by Scripts/check-hf-export.py).
    /// (It also generates with transformers' defaults, the key/value cache on, and round-trips
    /// text through the tokenizer.) `native`: loaded without remote code, as `modelClass`.
    func transformersLoss(_ workspace: Workspace, export: String, windows: Int, native modelClass: String? = nil) throws -> Double {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Scripts/check-hf-export.py")
        let result = try CLI.python([script.path, workspace.path(export), workspace.path("data/val.bin"), "\(windows)"]
                                        + (modelClass == nil ? [] : ["--native"]), timeout: 300)
        XCTAssertEqual(result.status, 0, result.stderr)
        let line = try XCTUnwrap(result.stdout.split(separator: "\n").last, result.stderr)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], String(line))
        if let modelClass { XCTAssertEqual(object["class"] as? String, modelClass) }
        return try XCTUnwrap(object["val_loss"] as? Double)
    }

    /// The llama block trained on 2 ranks exports as transformers' own classes, chosen by what
    /// the model has, and each scores the validation windows as `moe eval` does (1e-4 relative):
    /// Mixtral (no query/key norm, renormalised top-2, grouped-query attention, untied head),
    /// Qwen3-MoE (per-head norms, an MoE every second block, Switch's raw top-1 weight), OLMoE
    /// (whole-projection norms, weights not renormalised, tied head), Qwen2-MoE (a gated shared
    /// expert, fine-grained experts smaller than the dense blocks' FFN). Each export imports back
    /// (dense blocks included) and scores the same.
    func testLlamaExportsAsTransformersOwnClasses() throws {
        try requireTransformers()
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config.replacingOccurrences(of: "moe_every: 1}", with: "moe_every: 1, architecture: llama}"))
        let variants: [(String, [String])] = [
            ("MixtralForCausalLM", ["model.kv_heads=1", "model.tie_embeddings=false"]),
            ("Qwen3MoeForCausalLM", ["model.qk_norm=head", "model.moe_every=2", "moe.gate=switch", "moe.top_k=1", "model.rope_theta=500"]),
            ("OlmoeForCausalLM", ["model.qk_norm=full", "moe.renormalize=none", "model.norm_epsilon=1e-6"]),
            ("Qwen2MoeForCausalLM", ["moe.shared_experts=1", "moe.shared_gate=true", "moe.shared_hidden=24", "moe.expert_hidden=8",
                                     "model.moe_every=2"]),
        ]
        for (modelClass, settings) in variants {
            let run = "run-\(modelClass)", export = "hf-\(modelClass)"
            let trained = try CLI.mpirun(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", run] + settings.flatMap { ["--set", $0] },
                                         in: workspace.url)
            XCTAssertEqual(trained.status, 0, trained.stderr)
            let result = try CLI.run(["export", "--checkpoint", run, "--output", export], in: workspace.url)
            XCTAssertEqual(result.status, 0, result.stderr)
            XCTAssertTrue(result.stdout.contains("\(modelClass): "), result.stdout)
            XCTAssertFalse(FileManager.default.fileExists(atPath: workspace.path("\(export)/modeling_swiftmoe.py")))
            let expected = try evalLoss(workspace, run: run)
            XCTAssertEqual(try transformersLoss(workspace, export: export, windows: 4, native: modelClass), expected,
                           accuracy: 1e-4 * expected, modelClass)
            // And back: `moe import` of the export scores the same 4 windows alike.
            let back = "back-\(modelClass)"
            let imported = try CLI.run(["import", "--from", export, "--output", back, "--set", "train.batch_size=2", "--set", "train.eval_batches=2",
                                        "--set", "data.val=data/val.bin"],
                                       in: workspace.url)
            XCTAssertEqual(imported.status, 0, imported.stderr)
            XCTAssertEqual(try evalLoss(workspace, run: back), expected, accuracy: 1e-4 * expected, "\(modelClass) imported back")
        }
    }

    /// A llama model no transformers class represents is a one-line error saying what is missing.
    func testUnrepresentableLlamaModelIsRefused() throws {
        try assertExportRefused(Self.config.replacingOccurrences(of: "moe_every: 1}", with: "moe_every: 2, architecture: llama}"),
                                "export: no transformers class represents this llama model: dense blocks (model.moe_every 2) without query/key norms")
    }

    /// Trains `config` for 2 steps; its export fails with one line containing `message`.
    func assertExportRefused(_ config: String, _ message: String, line: UInt = #line) throws {
        let workspace = try Workspace()
        try workspace.write("c.yaml", config)
        let trained = try CLI.run(["train", "--config", "c.yaml", "--run-dir", "run", "--set", "train.steps=2"], in: workspace.url)
        XCTAssertEqual(trained.status, 0, trained.stderr, line: line)
        let result = try CLI.run(["export", "--checkpoint", "run", "--output", "hf"], in: workspace.url)
        XCTAssertNotEqual(result.status, 0, line: line)
        XCTAssertTrue(result.stderr.contains(message), result.stderr, line: line)
        XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, result.stderr, line: line)
    }

    func evalLoss(_ workspace: Workspace, run: String) throws -> Double {
        let result = try CLI.run(["eval", "--checkpoint", run, "--json"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        return try XCTUnwrap(MetricsRecord(line: result.stdout.trimmingCharacters(in: .newlines))?.validationLoss, result.stdout)
    }

    /// Trained on 2 ranks (each saves half the experts), exported merged: the transformers model
    /// scores the validation windows of `moe eval` (1 rank, 2 batches of 2) within 1e-4 relative.
    /// bf16 weights stay within 2% (8 significant bits per weight).
    func testExportedModelMatchesEvalInTransformers() throws {
        try requireTransformers()
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config)
        let trained = try CLI.mpirun(ranks: 2, ["train", "--config", "c.yaml", "--run-dir", "run"], in: workspace.url)
        XCTAssertEqual(trained.status, 0, trained.stderr)
        var result = try CLI.run(["export", "--checkpoint", "run", "--format", "hf", "--output", "hf"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stdout.contains("model.safetensors, config.json, modeling_swiftmoe.py, tokenizer.json"), result.stdout)
        let expected = try evalLoss(workspace, run: "run")
        let exported = try transformersLoss(workspace, export: "hf", windows: 4)
        XCTAssertEqual(exported, expected, accuracy: 1e-4 * expected)

        result = try CLI.run(["export", "--checkpoint", "run", "--output", "hf-bf16", "--dtype", "bf16"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let weights = try FileManager.default.attributesOfItem(atPath: workspace.path("hf-bf16/model.safetensors"))[.size] as! Int
        let full = try FileManager.default.attributesOfItem(atPath: workspace.path("hf/model.safetensors"))[.size] as! Int
        XCTAssertLessThan(weights, full * 6 / 10, "bf16 weights take half the bytes")
        XCTAssertEqual(try transformersLoss(workspace, export: "hf-bf16", windows: 4), expected, accuracy: 0.02 * expected)
    }

    /// EvoMoE before the spawn exports its dense FFNs as plain FFN layers (here with an untied
    /// output head, the other layout of the head).
    func testDensePhaseExportsDenseLayers() throws {
        try requireTransformers()
        let workspace = try Workspace()
        try workspace.write("c.yaml", Self.config.replacingOccurrences(of: "gate: topk", with: "gate: dts")
            .replacingOccurrences(of: "spawn_fraction: 0", with: "spawn_fraction: 0.5"))
        let trained = try CLI.run(["train", "--config", "c.yaml", "--run-dir", "run", "--stop-at", "4", "--set", "model.tie_embeddings=false"], in: workspace.url)
        XCTAssertEqual(trained.status, 0, trained.stderr)
        let result = try CLI.run(["export", "--checkpoint", "run", "--output", "hf"], in: workspace.url)
        XCTAssertEqual(result.status, 0, result.stderr)
        let config = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: workspace.path("hf/config.json")))) as? [String: Any])
        XCTAssertEqual(config["moe_layers"] as? [Int], [], "no MoE layer before the spawn")
        let expected = try evalLoss(workspace, run: "run")
        XCTAssertEqual(try transformersLoss(workspace, export: "hf", windows: 4), expected, accuracy: 1e-4 * expected)
    }

    /// A gate the exported model does not implement is a one-line error naming it.
    func testUnsupportedGateIsRefused() throws {
        try assertExportRefused(Self.config.replacingOccurrences(of: "gate: topk", with: "gate: hash"),
                                "export: gate 'hash' routes in a way the exported model does not implement")
    }
}
