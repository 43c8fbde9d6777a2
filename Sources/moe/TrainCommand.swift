import ArgumentParser
import Foundation
import MoEComm
import MoECore
import MoEIO

struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Train a model (under mpirun: on all ranks).",
        discussion: """
            Without --config the embedded default (the Shakespeare main job, configs/shakespeare.yaml) is used.
            The run directory receives config.yaml (the resolved config), metrics.jsonl and checkpoints/.
            """)

    @Option(name: .long, help: ArgumentHelp("YAML run config.", valueName: "file"))
    var config: String?

    @Option(name: .customLong("set"), help: ArgumentHelp("Override one config key, e.g. --set train.steps=100 (repeatable).", valueName: "key=value"))
    var overrides: [String] = []

    @Option(name: .customLong("run-dir"), help: ArgumentHelp("Run directory (default: runs/<config file name>).", valueName: "dir"))
    var runDirectory: String?

    @Flag(help: "Continue from the newest complete checkpoint in the run directory (starts fresh if there is none).")
    var resume = false

    @Option(name: .customLong("stop-at"), help: ArgumentHelp("Stop after this step with a checkpoint, keeping the schedule of train.steps (for time-limited allocations; continue with --resume).", valueName: "step"))
    var stopAt: Int?

    @Option(name: .customLong("inject-fault"), help: .hidden)
    var faults: [String] = []

    @Flag(name: .customLong("print-config"), help: "Print the resolved config with every key documented, and exit.")
    var printConfig = false

    func validate() throws {
        if let stopAt, stopAt < 1 { throw ValidationError("--stop-at must be >= 1") }
        for fault in faults where FaultInjection(fault) == nil {
            throw ValidationError("--inject-fault '\(fault)': expected KIND@RANK with KIND one of \(FaultInjection.Kind.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    func run() throws {
        Runtime.run { communicator in
            let log = Runtime.logger(communicator)
            // Agreed, so a config file unreadable on one node stops every rank with its message.
            let resolved = try communicator.agree { try RunConfig.load(file: config, overrides: overrides) }
            if printConfig {
                log(resolved.yaml().trimmingCharacters(in: .newlines))
                return
            }
            let directory = runDirectory ?? "runs/" + (config.map { (($0 as NSString).lastPathComponent as NSString).deletingPathExtension } ?? "default")
            if !resume, let existing = Checkpoint.complete(in: directory).last {
                throw ValidationError("run directory '\(directory)' already holds checkpoints (newest \(existing)); pass --resume to continue it or choose another --run-dir")
            }
            Runtime.announceEnvironment(log)
            let run = try TrainingRun(config: resolved, runDirectory: directory, resume: resume, communicator: communicator,
                                      faults: faults.compactMap(FaultInjection.init), log: log)
            for fault in faults.compactMap(FaultInjection.init) { fault.arm(run.trainer) }
            Runtime.installTerminationHandler()
            try run.run(stopAt: stopAt, stopRequested: { Runtime.terminationFlag.pointee != 0 })
        }
    }
}

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval", abstract: "Print the validation loss and perplexity of a checkpoint.")

    @Option(help: ArgumentHelp("A checkpoint directory, or a run directory (its newest complete checkpoint).", valueName: "dir"))
    var checkpoint: String

    @Option(help: ArgumentHelp("Token file or glob to evaluate on (default: the checkpoint config's data.val).", valueName: "path"))
    var data: String?

    @Option(help: "Global batches of evaluation windows (default: the checkpoint config's train.eval_batches).")
    var batches: Int?

    @Flag(help: "Print one JSON object (full precision) instead of the text line.")
    var json = false

    func run() throws {
        Runtime.run { communicator in
            let loaded = try LoadedCheckpoint(checkpoint, communicator: communicator)
            let patterns = data.map { [$0] } ?? loaded.config.data.val
            guard !patterns.isEmpty else { throw ValidationError("the checkpoint's config has no data.val; pass --data") }
            let files = try TokenFile.read(patterns: patterns, key: data == nil ? "data.val" : "--data")
            for file in files where file.vocabularySize > loaded.model.vocabularySize {
                throw TokenBatches.DataError.vocabularyMismatch(path: file.path, file: file.vocabularySize, model: loaded.model.vocabularySize)
            }
            let windows = try TokenBatches(files: files, length: loaded.config.model.context, seed: 0)
            let path = windows.path
            let batchCount = batches ?? loaded.config.train.evalBatches
            guard batchCount > 0 else { throw ValidationError("--batches must be positive") }
            let loss = try Trainer.evaluate(model: loaded.model, data: windows, batches: batchCount,
                                            batchSize: loaded.config.train.batchSize, communicator: communicator,
                                            step: loaded.manifest.step)
            let tokens = batchCount * communicator.size * loaded.config.train.batchSize * loaded.config.model.context
            var line = String(format: "step %d | val_loss %.4f | perplexity %.3f | %d tokens of %@", loaded.manifest.step, loss, exp(loss), tokens, path)
            var record: [String: Any] = ["step": loaded.manifest.step, "val_loss": loss, "perplexity": exp(loss), "tokens": tokens, "data": path]
            // Nats per byte of text compare models with different tokenizers (a byte model's
            // loss already is one).
            if let tokenizer = try? loaded.textTokenizer(override: nil), loaded.model.vocabularySize != 256 {
                let bytes = try Trainer.evaluatedBytes(data: windows, batches: batchCount, batchSize: loaded.config.train.batchSize,
                                                       communicator: communicator, tokenizer: tokenizer)
                let perByte = loss * Double(tokens) / Double(bytes)
                line += String(format: " | %.4f nats per byte (%.3f bytes per token)", perByte, Double(bytes) / Double(tokens))
                record["nats_per_byte"] = perByte
                record["bytes"] = bytes
            }
            if json { line = String(decoding: try JSONSerialization.data(withJSONObject: record, options: [.sortedKeys]), as: UTF8.self) }
            Runtime.logger(communicator)(line)
        }
    }
}

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate", abstract: "Sample text from a checkpoint.",
        discussion: "Text goes through the checkpoint's tokenizer (bytes for a byte-level model); --tokenizer overrides it.")

    @Option(help: ArgumentHelp("A checkpoint directory, or a run directory (its newest complete checkpoint).", valueName: "dir"))
    var checkpoint: String

    @Option(help: "Text to continue.")
    var prompt: String = "\n"

    @Option(help: "Tokens to generate.")
    var tokens: Int = 500

    @Option(help: "Sampling temperature; 0 picks the most likely token.")
    var temperature: Double = 0.8

    @Option(name: .customLong("top-k"), help: "Sample among the k most likely tokens only (0: all).")
    var topK: Int = 0

    @Option(name: .customLong("top-p"), help: "Sample within the smallest set of tokens whose probability reaches p (1: all).")
    var topP: Double = 1

    @Option(help: "Seed of the sampling draws.")
    var seed: Int = 0

    @Flag(name: .customLong("no-cache"), help: "Recompute the whole window for every token instead of using the key/value cache (for comparison).")
    var noCache = false

    @Option(help: ArgumentHelp("A tokenizer.json, or llm.c's gpt2_tokenizer.bin (default: the checkpoint's own).", valueName: "file"))
    var tokenizer: String?

    func validate() throws {
        guard tokens >= 0 else { throw ValidationError("--tokens must be >= 0") }
        guard temperature >= 0, temperature.isFinite else { throw ValidationError("--temperature must be >= 0") }
        guard topK >= 0 else { throw ValidationError("--top-k must be >= 0") }
        guard topP > 0, topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]") }
        guard !prompt.isEmpty else { throw ValidationError("--prompt must not be empty") }
    }

    func run() throws {
        Runtime.run { communicator in
            let loaded = try LoadedCheckpoint(checkpoint, communicator: communicator)
            let codec = try loaded.textTokenizer(override: tokenizer)
            let promptTokens = codec.encode(prompt)
            var pending: [UInt8] = Array(prompt.utf8)
            let isPrinter = communicator.rank == 0
            // Decoding multiplies one row at a time: BLAS threads only add synchronisation
            // (measured: 494 tokens/s with the default threads, 698 with one), in both modes.
            if getenv("OPENBLAS_NUM_THREADS") == nil { BLASInfo.setBLASThreads(1) }
            let started = DispatchTime.now().uptimeNanoseconds
            let settings = SamplingSettings(temperature: temperature, topK: topK, topP: topP, seed: seed, vocabularyLimit: codec.vocabularySize)
            try Sampler.generate(model: loaded.model, prompt: promptTokens, count: tokens, settings: settings, useCache: !noCache,
                                 step: loaded.manifest.step) { token in
                guard isPrinter else { return }
                pending += codec.decode(token)
                // Print all but an unfinished UTF-8 sequence at the end (invalid bytes print as U+FFFD).
                let ready = GenerateCommand.completeUTF8Prefix(pending)
                if ready > 0 {
                    FileHandle.standardOutput.write(Data(String(decoding: pending[..<ready], as: UTF8.self).utf8))
                    pending.removeFirst(ready)
                }
            }
            if isPrinter {
                if !pending.isEmpty { FileHandle.standardOutput.write(Data(String(decoding: pending, as: UTF8.self).utf8)) }
                FileHandle.standardOutput.write(Data("\n".utf8))
                let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
                FileHandle.standardError.write(Data(String(format: "%d tokens in %.2f s: %.1f tokens/s (%@)\n", tokens, seconds,
                                                           Double(tokens) / max(seconds, 1e-9), noCache ? "no cache" : "key/value cache").utf8))
            }
        }
    }
}

extension GenerateCommand {
    /// The length of `bytes` without a trailing lead byte whose continuation has not arrived yet.
    static func completeUTF8Prefix(_ bytes: [UInt8]) -> Int {
        guard !bytes.isEmpty else { return 0 }
        for back in 1...min(3, bytes.count) {
            let byte = bytes[bytes.count - back]
            guard byte & 0xC0 == 0x80 else {
                let needed = byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1
                return needed > back ? bytes.count - back : bytes.count
            }
        }
        return bytes.count
    }
}

struct PrepareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prepare",
        abstract: "Turn text files (or folders of them) into token files DIR/train.bin and DIR/val.bin.",
        discussion: """
            With several input files the split is by file, so no document is on both sides; a single file is
            split at a line boundary. Token files use the llm.c format (256 int32 header, uint16 tokens).
            Tokens are bytes by default; --tokenizer bpe learns a byte-level BPE of --vocab-size tokens on the
            training split only and writes it as DIR/tokenizer.json (Hugging Face format), which training
            copies into every checkpoint and generate uses.
            """)

    enum TokenizerKind: String, ExpressibleByArgument, CaseIterable { case bytes, bpe }

    @Option(name: .customLong("input"), help: ArgumentHelp("A text file or folder (repeatable).", valueName: "path"))
    var inputs: [String] = []

    @Option(name: .customLong("val-input"), help: ArgumentHelp("Files or folders that form the validation split (repeatable); overrides --val-fraction.", valueName: "path"))
    var validationInputs: [String] = []

    @Option(help: ArgumentHelp("Output directory.", valueName: "dir"))
    var output: String

    @Option(name: .customLong("val-fraction"), help: "Fraction of the files (or of a single file) held out for validation.")
    var validationFraction: Double = 0.1

    @Option(help: "Tokens: bytes (one per byte, vocabulary 256) or bpe (learned on the training split).")
    var tokenizer: TokenizerKind = .bytes

    @Option(name: .customLong("vocab-size"), help: "Vocabulary of the BPE tokenizer (257 to 65536: 256 bytes plus merges).")
    var vocabularySize: Int?

    func validate() throws {
        guard !inputs.isEmpty else { throw ValidationError("give at least one --input") }
        guard (0..<1).contains(validationFraction) else { throw ValidationError("--val-fraction must be in [0, 1)") }
        switch (tokenizer, vocabularySize) {
        case (.bytes, nil): break
        case (.bytes, _?): throw ValidationError("--vocab-size needs --tokenizer bpe")
        case (.bpe, nil): throw ValidationError("--tokenizer bpe needs --vocab-size")
        case let (.bpe, size?): guard (257...65536).contains(size) else { throw ValidationError("--vocab-size must be in 257...65536 (token files hold uint16 ids)") }
        }
    }

    func run() throws {
        Runtime.run { communicator in
            guard communicator.rank == 0 else { return }
            let choice: DatasetPreparation.TokenizerChoice = vocabularySize.map { .bpe(vocabularySize: $0) } ?? .bytes
            let summary = try DatasetPreparation.prepare(inputs: inputs, valInputs: validationInputs, output: output,
                                                         valFraction: validationFraction, tokenizer: choice)
            let tokenizerNote = choice == .bytes ? "" : " and \(output)/\(Tokenizers.fileName)"
            print("wrote \(output)/train.bin, \(output)/val.bin\(tokenizerNote): \(summary)")
        }
    }
}
