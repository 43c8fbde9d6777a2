import ArgumentParser
import Foundation
import MoECore

struct CompareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Compare finished runs: a Markdown table (validation loss, tokens/s, load balance, drops) and an SVG of the validation curves.",
        discussion: "load CV: coefficient of variation of the expert load per MoE layer, averaged over logged steps (0 = perfectly balanced).")

    @Argument(help: ArgumentHelp("Run directories (each with metrics.jsonl).", valueName: "run-dir"))
    var runs: [String]

    @Option(help: ArgumentHelp("Where to write comparison.md and validation.svg.", valueName: "dir"))
    var output: String = "."

    func run() throws {
        Runtime.run { _ in
            let summaries = try runs.map { try RunSummary(runDirectory: $0) }
            try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
            let table = GateComparison.table(summaries)
            try table.write(toFile: (output as NSString).appendingPathComponent("comparison.md"), atomically: true, encoding: .utf8)
            try GateComparison.chart(summaries).write(toFile: (output as NSString).appendingPathComponent("validation.svg"),
                                                      atomically: true, encoding: .utf8)
            print(table, terminator: "")
        }
    }
}
