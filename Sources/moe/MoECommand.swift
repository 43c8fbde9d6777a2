import ArgumentParser

@main
struct MoECommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "moe",
        abstract: "SwiftMoE: train sparse mixture-of-experts language models on CPUs and MPI clusters.",
        discussion: """
            Run under `mpirun -np R moe ...` to use R ranks (experts are sharded across them);
            without mpirun everything runs in one process.
            """,
        subcommands: [TrainCommand.self, EvalCommand.self, GenerateCommand.self, PrepareCommand.self, BenchCommand.self, CompareCommand.self, ReportCommand.self,
                      CheckpointCommand.self, ExportCommand.self, ImportCommand.self, UpcycleCommand.self])
}
