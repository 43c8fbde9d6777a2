import ArgumentParser
import Foundation
import MoECore

struct CompareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Compare finished runs: a Markdown table (validation loss, compute, tokens/s, load balance, drops) and SVGs of the validation curves.",
        discussion: """
            Runs whose configs differ only in train.seed form one row: mean ± sample standard deviation over the seeds, and \
            their mean curve. A run directory named seed<N> takes its parent's name. compute: model FLOPs of training \
            (what each gate actually computed). load CV: coefficient of variation of the expert load per MoE layer, averaged \
            over logged steps (0 = perfectly balanced). Writes comparison.md, validation.svg (by step) and \
            validation-by-compute.svg.
            """)

    @Argument(help: ArgumentHelp("Run directories (each with metrics.jsonl).", valueName: "run-dir"))
    var runs: [String]

    @Option(help: ArgumentHelp("Where to write comparison.md and the charts.", valueName: "dir"))
    var output: String = "."

    func run() throws {
        Runtime.run { _ in
            let summaries = try runs.map { try RunSummary(runDirectory: $0) }
            try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
            let table = GateComparison.table(summaries)
            try table.write(toFile: (output as NSString).appendingPathComponent("comparison.md"), atomically: true, encoding: .utf8)
            for (file, byCompute) in [("validation.svg", false), ("validation-by-compute.svg", true)] {
                try GateComparison.chart(summaries, byCompute: byCompute).write(
                    toFile: (output as NSString).appendingPathComponent(file), atomically: true, encoding: .utf8)
            }
            print(table, terminator: "")
        }
    }
}
