import ArgumentParser
import Foundation
import MoEComm
import MoECore
import MoEIO

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate", abstract: "Sample text from a checkpoint.",
        discussion: "Text goes through the checkpoint's tokenizer (bytes for a byte-level model); --tokenizer overrides it.")

    @Option(help: ArgumentHelp("A checkpoint directory, or a run directory (its newest complete checkpoint).", valueName: "dir"))
    var checkpoint: String

    @Option(help: "Text to continue.")
    var prompt: String = "\n"

    @Option(parsing: .unconditional, help: "Tokens to generate.")
    var tokens: Int = 500

    @Option(parsing: .unconditional, help: "Sampling temperature; 0 picks the most likely token.")
    var temperature: Double = 0.8

    @Option(name: .customLong("top-k"), parsing: .unconditional, help: "Sample among the k most likely tokens only (0: all).")
    var topK: Int = 0

    @Option(name: .customLong("top-p"), parsing: .unconditional, help: "Sample within the smallest set of tokens whose probability reaches p (1: all).")
    var topP: Double = 1

    @Option(parsing: .unconditional, help: "Seed of the sampling draws.")
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
