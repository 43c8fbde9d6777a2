import ArgumentParser
import Foundation
import MoECore

struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Write a self-contained HTML report of a run: loss, schedules, throughput, expert load heat maps, phases.")

    @Argument(help: ArgumentHelp("The run directory (with metrics.jsonl).", valueName: "run-dir"))
    var runDirectory: String

    @Option(help: ArgumentHelp("Output file (default: RUN_DIR/report.html).", valueName: "file"))
    var output: String?

    func run() throws {
        Runtime.run { _ in
            let summary = try RunSummary(runDirectory: runDirectory)
            let config = (try? String(contentsOfFile: (runDirectory as NSString).appendingPathComponent("config.yaml"), encoding: .utf8)) ?? ""
            let path = output ?? (runDirectory as NSString).appendingPathComponent("report.html")
            try RunReport.html(summary, config: config).write(toFile: path, atomically: true, encoding: .utf8)
            print("wrote \(path)")
        }
    }
}
