import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoEIO

final class OptimizerTests: XCTestCase {
    /// AdamW against a direct transcription of the update rule, in Double, with one decayed and
    /// one undecayed tensor, a gradient scale (clipping) and 5 steps.
    func testAdamWMatchesTheReferenceUpdate() {
        let store = ParameterStore<Double, Replicated>()
        let matrix = store.add("w", rows: 3, columns: 7, weightDecay: true, initialization: .normal(standardDeviation: 1))
        _ = store.add("b", rows: 1, columns: 19, weightDecay: false, initialization: .normal(standardDeviation: 1))
        store.initialize(key: RandomKey(3))
        let settings = AdamWSettings(beta1: 0.9, beta2: 0.95, epsilon: 1e-8, weightDecay: 0.1)
        let optimizer = AdamW(store: store, settings: settings)
        var p = Array(UnsafeBufferPointer(start: store.values, count: store.count))
        var m = [Double](repeating: 0, count: p.count), v = m
        let decayed = (0..<p.count).map { $0 < matrix.count }
        for step in 1...5 {
            let learningRate = 0.01 * Double(step), scale = 0.5
            for index in 0..<p.count { store.gradients[index] = sin(Double(index * step)) }
            optimizer.update(learningRate: learningRate, gradientScale: scale)
            for index in 0..<p.count {
                let g = store.gradients[index] * scale
                m[index] = 0.9 * m[index] + 0.1 * g
                v[index] = 0.95 * v[index] + 0.05 * g * g
                let mHat = m[index] / (1 - pow(0.9, Double(step))), vHat = v[index] / (1 - pow(0.95, Double(step)))
                if decayed[index] { p[index] -= learningRate * 0.1 * p[index] }
                p[index] -= learningRate * mHat / (vHat.squareRoot() + 1e-8)
            }
            for index in 0..<p.count {
                XCTAssertEqual(store.values[index], p[index], accuracy: 1e-12 * max(1, abs(p[index])), "step \(step) index \(index)")
            }
        }
        XCTAssertEqual(optimizer.stepCount, 5)
    }

    func testScheduleWarmsUpThenDecaysToTheMinimum() {
        let schedule = LearningRateSchedule(peak: 1e-3, minimum: 1e-4, warmupSteps: 10, totalSteps: 110)
        XCTAssertEqual(schedule.learningRate(at: 0), 1e-4, accuracy: 1e-15)
        XCTAssertEqual(schedule.learningRate(at: 9), 1e-3, accuracy: 1e-15)
        XCTAssertEqual(schedule.learningRate(at: 10), 1e-3, accuracy: 1e-15)
        XCTAssertEqual(schedule.learningRate(at: 60), 5.5e-4, accuracy: 1e-12, "half way down the cosine")
        XCTAssertEqual(schedule.learningRate(at: 110), 1e-4, accuracy: 1e-15)
        for step in 10..<110 { XCTAssertGreaterThanOrEqual(schedule.learningRate(at: step), schedule.learningRate(at: step + 1)) }
    }
}

final class DataTests: XCTestCase {
    func file(_ count: Int) -> TokenFile {
        TokenFile(path: "memory", tokens: (0..<count).map { UInt16($0 % 251) }, vocabularySize: 256)
    }

    /// The global batch is a function of seed and step only: R ranks with B sequences each see
    /// exactly what one rank with R*B sequences sees.
    func testGlobalBatchDoesNotDependOnTheRankCount() throws {
        let batches = try TokenBatches(file: file(5000), length: 16, seed: 9)
        var wholeInputs: [Int32] = [], wholeTargets: [Int32] = []
        batches.trainingBatch(step: 3, rank: 0, batchSize: 8, inputs: &wholeInputs, targets: &wholeTargets)
        for ranks in [2, 4, 8] {
            var inputs: [Int32] = [], targets: [Int32] = []
            var joined: [Int32] = [], joinedTargets: [Int32] = []
            for rank in 0..<ranks {
                batches.trainingBatch(step: 3, rank: rank, batchSize: 8 / ranks, inputs: &inputs, targets: &targets)
                joined += inputs
                joinedTargets += targets
            }
            XCTAssertEqual(joined, wholeInputs, "\(ranks) ranks")
            XCTAssertEqual(joinedTargets, wholeTargets)
        }
        // Targets are the inputs shifted by one token.
        XCTAssertEqual(Array(wholeInputs[1..<16]), Array(wholeTargets[0..<15]))
        var other: [Int32] = [], otherTargets: [Int32] = []
        batches.trainingBatch(step: 4, rank: 0, batchSize: 8, inputs: &other, targets: &otherTargets)
        XCTAssertNotEqual(other, wholeInputs, "another step draws other windows")
    }

    /// Windows of sharded data never cross a shard boundary, every shard is used, and a list or a
    /// glob names the shards in order.
    func testShardedWindowsStayInsideTheirShard() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("moe-shards-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // Shard s holds tokens 100 s + (0..<50) in order, so a window's shard and continuity show.
        for shard in 0..<3 {
            try TokenFile.write(tokens: (0..<(40 + 30 * shard)).map { UInt16(100 * shard + $0 % 50) }, vocabularySize: 512,
                                to: "\(directory)/train_\(shard).bin")
        }
        let files = try TokenFile.read(patterns: ["\(directory)/train_*.bin"], key: "data.train")
        XCTAssertEqual(files.map { ($0.path as NSString).lastPathComponent }, ["train_0.bin", "train_1.bin", "train_2.bin"])
        let batches = try TokenBatches(files: files, length: 16, seed: 3)
        XCTAssertEqual(batches.windowCount, (40 - 16) + (70 - 16) + (100 - 16))
        var inputs: [Int32] = [], targets: [Int32] = [], seen: Set<Int32> = []
        for step in 0..<50 {
            batches.trainingBatch(step: step, rank: 0, batchSize: 8, inputs: &inputs, targets: &targets)
            for sequence in 0..<8 {
                let window = inputs[(sequence * 16)..<((sequence + 1) * 16)] + [targets[sequence * 16 + 15]]
                XCTAssertEqual(Set(window.map { $0 / 100 }).count, 1, "window crosses a shard: \(Array(window))")
                seen.insert(window.first! / 100)
            }
        }
        XCTAssertEqual(seen, [0, 1, 2], "every shard is drawn from")
        XCTAssertThrowsError(try TokenFile.read(patterns: ["\(directory)/none_*.bin"], key: "data.val")) { error in
            XCTAssertEqual("\(error)", "data.val: '\(directory)/none_*.bin' matches no file")
        }
    }

    func testEvaluationWindowsAreFixedAndSpreadOverTheFile() throws {
        let batches = try TokenBatches(file: file(10_000), length: 16, seed: 1)
        var starts: [Int32] = []
        var inputs: [Int32] = [], targets: [Int32] = []
        for index in 0..<4 {
            batches.evaluationBatch(index: index, batches: 4, rank: 0, ranks: 1, batchSize: 2, inputs: &inputs, targets: &targets)
            starts += [inputs[0], inputs[16]]
        }
        XCTAssertEqual(Set(starts).count, 8, "eight distinct windows")
        XCTAssertThrowsError(try TokenBatches(file: file(10), length: 16, seed: 1)) { error in
            XCTAssertTrue("\(error)".contains("too few"))
        }
    }

    func testTokenFileRoundTripAndVocabularyInference() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tokens-\(UUID()).bin").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try TokenFile.write(tokens: [1, 2, 50_000], vocabularySize: 0, to: path)
        let read = try TokenFile.read(path)
        XCTAssertEqual(Array(read.tokens), [1, 2, 50_000])
        XCTAssertEqual(read.vocabularySize, 50257, "GPT-2 ids without a declared vocabulary")
        try TokenFile.write(tokens: [1, 2, 200], vocabularySize: 0, to: path)
        XCTAssertEqual(try TokenFile.read(path).vocabularySize, 256)
    }
}

final class CheckpointFormatTests: XCTestCase {
    func testSHA256StandardVectors() {
        XCTAssertEqual(SHA256.hex(of: Array("".utf8)), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(SHA256.hex(of: Array("abc".utf8)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(SHA256.hex(of: Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)),
                       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        let million = [UInt8](repeating: 0x61, count: 1_000_000)
        var hasher = SHA256()
        million.withUnsafeBytes { hasher.update($0) }
        XCTAssertEqual(hasher.finalizeHex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    func testSafetensorsRoundTrip() throws {
        let a: [Float] = (0..<6).map { Float($0) * 0.5 }, b: [Float] = [-1, 2, 3.25]
        let data = try a.withUnsafeBufferPointer { pa in
            try b.withUnsafeBufferPointer { pb in
                try Safetensors.encode([.init(name: "a", shape: [2, 3], values: pa), .init(name: "b", shape: [3], values: pb)],
                                       metadata: ["format": "pt"])
            }
        }
        let file = try Safetensors.File(path: "memory", data: data)
        XCTAssertEqual(file.tensors["a"]?.shape, [2, 3])
        XCTAssertEqual(file.metadata["format"], "pt")
        var out = [Float](repeating: 0, count: 3)
        try out.withUnsafeMutableBufferPointer { try file.read("b", shape: [3], into: $0.baseAddress!) }
        XCTAssertEqual(out, b)
        XCTAssertThrowsError(try out.withUnsafeMutableBufferPointer { try file.read("a", shape: [3], into: $0.baseAddress!) })
        XCTAssertEqual((8 + Int(data.withUnsafeBytes { $0.load(as: UInt64.self) })) % 8, 0, "data section 8-byte aligned")
    }

    /// Hostile files give errors, never crashes or huge allocations.
    func testSafetensorsRejectsHostileHeaders() throws {
        func header(_ json: String, dataBytes: Int = 0) -> Data {
            var data = Data()
            withUnsafeBytes(of: UInt64(json.utf8.count).littleEndian) { data.append(contentsOf: $0) }
            data.append(Data(json.utf8))
            data.append(Data(count: dataBytes))
            return data
        }
        var absurd = Data()
        withUnsafeBytes(of: UInt64(1) << 62) { absurd.append(contentsOf: $0) }
        let hostile: [(Data, String)] = [
            (Data([1, 2, 3]), "shorter than"),
            (absurd, "header length"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", dataBytes: 8), "outside"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", dataBytes: 16), "does not match"),
            (header("{\"a\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}}", dataBytes: 8), "dtype"),
            (header("[1,2]"), "not a JSON object"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627775,1099511627775],\"data_offsets\":[0,4]}}", dataBytes: 4), "does not match"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", dataBytes: 12), "overlap"),
        ]
        for (data, expected) in hostile {
            XCTAssertThrowsError(try Safetensors.File(path: "x.safetensors", data: data)) { error in
                XCTAssertTrue("\(error)".contains(expected) && "\(error)".contains("x.safetensors"), "\(error)")
            }
        }
        // Random mutations of a valid file: every outcome is a parse or an error.
        let values: [Float] = (0..<32).map(Float.init)
        let valid = try values.withUnsafeBufferPointer { try Safetensors.encode([.init(name: "w", shape: [4, 8], values: $0)]) }
        let key = RandomKey(11)
        for trial in 0..<2000 {
            var mutated = valid
            for flip in 0..<(1 + key.derive(trial).integer(0, below: 4)) {
                let index = key.derive(trial).integer(1 + flip, below: mutated.count)
                mutated[index] = UInt8(key.derive(trial).integer(10 + flip, below: 256))
            }
            if key.derive(trial).integer(99, below: 5) == 0 { mutated = mutated.prefix(key.derive(trial).integer(98, below: mutated.count)) }
            _ = try? Safetensors.File(path: "fuzz", data: Data(mutated))
        }
    }
}

final class ConfigTests: XCTestCase {
    func testOverridesAndResolvedRoundTrip() throws {
        let config = try RunConfig.load(file: nil, overrides: ["train.steps=7", "moe.capacity_factor=none", "data.val=", "train.lr=2e-3"])
        XCTAssertEqual(config.train.steps, 7)
        XCTAssertNil(config.moe.capacityFactor)
        XCTAssertEqual(config.data.val, [])
        XCTAssertEqual(config.train.learningRate, 2e-3)
        let reread = try RunConfig.fromResolved(config.yaml(), file: "resolved")
        XCTAssertEqual(reread, config, "the written config reads back to the same values")
        XCTAssertEqual(config.differingKeys(from: RunConfig()), ["moe.capacity_factor", "train.steps", "train.lr", "data.val"])
    }

    func testShippedConfigsLoad() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        for name in ["tiny", "shakespeare", "bench", "gpt2-small-moe"] {
            XCTAssertNoThrow(try RunConfig.load(file: root.appendingPathComponent("configs/\(name).yaml").path), name)
        }
        let shakespeare = try RunConfig.load(file: root.appendingPathComponent("configs/shakespeare.yaml").path)
        XCTAssertEqual(shakespeare, RunConfig(), "configs/shakespeare.yaml spells out the embedded default")
    }
}
