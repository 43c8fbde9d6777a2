import ArgumentParser
import Foundation
import MoEComm
import MoECore
import MoEIO

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

    @Option(name: .customLong("val-fraction"), parsing: .unconditional, help: "Fraction of the files (or of a single file) held out for validation.")
    var validationFraction: Double = 0.1

    @Option(help: "Tokens: bytes (one per byte, vocabulary 256) or bpe (learned on the training split).")
    var tokenizer: TokenizerKind = .bytes

    @Option(name: .customLong("vocab-size"), parsing: .unconditional, help: "Vocabulary of the BPE tokenizer (257 to 65536: 256 bytes plus merges).")
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
