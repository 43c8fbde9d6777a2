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

    @Flag(help: "Continue from the newest complete checkpoint in the run directory (starts fresh if there is none); without --config, from the run directory's config.yaml.")
    var resume = false

    @Option(name: .customLong("stop-at"), parsing: .unconditional, help: ArgumentHelp("Stop after this step with a checkpoint, keeping the schedule of train.steps (for time-limited allocations; continue with --resume).", valueName: "step"))
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
            let directory = runDirectory ?? "runs/" + (config.map { (($0 as NSString).lastPathComponent as NSString).deletingPathExtension } ?? "default")
            // Resuming without --config continues the run's own config (an imported or upcycled
            // model's included), with the --set overrides on top.
            let runConfig = (directory as NSString).appendingPathComponent("config.yaml")
            let file = config ?? (resume && FileManager.default.fileExists(atPath: runConfig) ? runConfig : nil)
            // Agreed, so a config file unreadable on one node stops every rank with its message.
            let resolved = try communicator.agree { try RunConfig.load(file: file, overrides: overrides) }
            if printConfig {
                log(resolved.yaml().trimmingCharacters(in: .newlines))
                return
            }
            if !resume, let existing = Checkpoint.complete(in: directory).last {
                throw ValidationError("run directory '\(directory)' already holds checkpoints (newest \(existing)); pass --resume to continue it or choose another --run-dir")
            }
            Runtime.announceEnvironment(log)
            let injector = faults.isEmpty ? nil : FaultInjector(faults.compactMap(FaultInjection.init), rank: communicator.rank,
                                                                runDirectory: directory)
            let run = try TrainingRun(config: resolved, runDirectory: directory, resume: resume, communicator: communicator,
                                      hooks: injector, log: log)
            Runtime.installTerminationHandler()
            try run.run(stopAt: stopAt, stopRequested: { Runtime.terminationFlag.pointee != 0 })
        }
    }
}
