import Foundation
import MoEComm
import MoECore
import MoEIO

/// A model rebuilt from a checkpoint's own config and loaded with its weights (no optimizer).
struct LoadedCheckpoint {
    let directory: String
    let manifest: CheckpointManifest
    let config: RunConfig
    let model: GPTModel<Float>

    /// `path` is a checkpoint directory or a run directory (then its newest complete checkpoint).
    init(_ path: String, communicator: Communicator) throws {
        if FileManager.default.fileExists(atPath: (path as NSString).appendingPathComponent(Checkpoint.manifestFile)) {
            directory = path
        } else if let newest = Checkpoint.complete(in: path).last {
            directory = newest
        } else {
            throw CheckpointError.notACheckpoint(path: path, reason: "neither a checkpoint directory nor a run directory with a complete checkpoint")
        }
        manifest = try Checkpoint.readManifest(directory)
        config = try Checkpoint.config(of: manifest, directory: directory)
        model = try GPTModel<Float>(config, vocabularySize: manifest.vocabularySize, communicator: communicator)
        try Checkpoint.load(directory, manifest: manifest, model: model)
    }
}
