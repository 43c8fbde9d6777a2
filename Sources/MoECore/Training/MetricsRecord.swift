import Foundation

/// One line of `metrics.jsonl`, and of `moe eval --json`: the one statement of the metrics
/// schema, which the writer (TrainingRun), the reader (RunSummary), `moe eval` and the tests
/// share. Three kinds of record, told apart by which fields they carry:
/// - a training step: `loss` (null when not finite: the step was skipped), `lr` and the rest of
///   the step's fields;
/// - a validation: `val_loss` and `train_flops` (the compute spent before it);
/// - `moe eval`: `val_loss`, `perplexity`, `tokens`, `data`, and for a non-byte vocabulary
///   `nats_per_byte` and `bytes`.
/// Fields are written in declaration order, absent ones left out; JSON has no NaN or infinity,
/// so non-finite numbers are written as null and read back as nil.
public struct MetricsRecord: Codable, Equatable {
    public var step: Int
    public var validationLoss: Double?
    public var loss: Double?
    public var learningRate: Double?
    public var tokensPerSecond: Double?
    public var auxiliaryLoss: Double?
    public var droppedFraction: Double?
    /// Per MoE layer, the fraction of assignments each expert received (empty rows in EvoMoE's
    /// dense phase).
    public var expertLoad: [[Double]]?
    /// Per MoE layer, loss-free balancing's selection bias per expert (after the step).
    public var expertBias: [[Double]]?
    public var activeExperts: Double?
    public var gradientNorm: Double?
    public var temperature: Double?
    public var phase: TrainingPhase?
    public var skippedUpdates: Int?
    /// Model FLOPs and seconds of training so far (`TrainingState`).
    public var trainingFlops: Double?
    public var trainingSeconds: Double?
    /// Per MoE layer, the coefficient of variation of the expert load.
    public var loadCoefficientOfVariation: [Double]?
    /// Per MoE layer, the router's mean entropy (nil for a layer whose gate has none).
    public var routerEntropy: [Double?]?
    public var perplexity: Double?
    public var tokens: Int?
    public var data: String?
    public var natsPerByte: Double?
    public var bytes: Int?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case step, validationLoss = "val_loss", loss, learningRate = "lr", tokensPerSecond = "tokens_per_sec", auxiliaryLoss = "aux_loss"
        case droppedFraction = "dropped_fraction", expertLoad = "expert_load", expertBias = "expert_bias", activeExperts = "active_experts"
        case gradientNorm = "grad_norm", temperature, phase, skippedUpdates = "skipped_updates"
        case trainingFlops = "train_flops", trainingSeconds = "train_seconds", loadCoefficientOfVariation = "load_cv"
        case routerEntropy = "router_entropy", perplexity, tokens, data
        case natsPerByte = "nats_per_byte", bytes
    }

    public enum ReadError: Error, CustomStringConvertible {
        case unreadable(String)
        case malformed(path: String, line: Int)
        case stepOutOfRange(path: String, line: Int, step: Int)
        public var description: String {
            switch self {
            case let .unreadable(path): return "metrics: cannot read '\(path)'"
            case let .malformed(path, line): return "metrics: '\(path)' line \(line) is not a metrics record"
            case let .stepOutOfRange(path, line, step):
                return "metrics: '\(path)' line \(line): step \(step) is outside 0...\(MetricsRecord.maximumStep)"
            }
        }
    }

    /// The largest step a record may carry: every step is exact as a Double (the charts' x) and
    /// step + 1 cannot overflow.
    public static let maximumStep = 1 << 53

    public init(step: Int) { self.step = step }

    /// A training step's record (it carries `lr`), as opposed to a validation or evaluation one.
    public var isTrainingStep: Bool { learningRate != nil }

    /// The record as one line of JSON (no newline).
    public var jsonLine: String {
        var object = JSONObject()
        object.add(CodingKeys.step.rawValue, step)
        if let validationLoss { object.add(CodingKeys.validationLoss.rawValue, validationLoss) }
        let numbers: [(CodingKeys, Double?)] = [(.loss, loss), (.learningRate, learningRate), (.tokensPerSecond, tokensPerSecond),
                                                (.auxiliaryLoss, auxiliaryLoss), (.droppedFraction, droppedFraction)]
        for (key, value) in numbers { if let value { object.add(key.rawValue, value) } }
        if let expertLoad { object.add(CodingKeys.expertLoad.rawValue, expertLoad) }
        if let expertBias { object.add(CodingKeys.expertBias.rawValue, expertBias) }
        for (key, value) in [(CodingKeys.activeExperts, activeExperts), (.gradientNorm, gradientNorm), (.temperature, temperature)] {
            if let value { object.add(key.rawValue, value) }
        }
        if let phase { object.add(CodingKeys.phase.rawValue, phase.rawValue) }
        if let skippedUpdates { object.add(CodingKeys.skippedUpdates.rawValue, skippedUpdates) }
        for (key, value) in [(CodingKeys.trainingFlops, trainingFlops), (.trainingSeconds, trainingSeconds)] {
            if let value { object.add(key.rawValue, value) }
        }
        if let loadCoefficientOfVariation { object.add(CodingKeys.loadCoefficientOfVariation.rawValue, loadCoefficientOfVariation) }
        if let routerEntropy { object.add(CodingKeys.routerEntropy.rawValue, routerEntropy.map { $0 ?? .nan }) }
        if let perplexity { object.add(CodingKeys.perplexity.rawValue, perplexity) }
        if let tokens { object.add(CodingKeys.tokens.rawValue, tokens) }
        if let data { object.add(CodingKeys.data.rawValue, data) }
        if let natsPerByte { object.add(CodingKeys.natsPerByte.rawValue, natsPerByte) }
        if let bytes { object.add(CodingKeys.bytes.rawValue, bytes) }
        return object.text
    }

    /// Decodes one line; nil when it is not a metrics record.
    public init?(line: some StringProtocol) {
        guard let record = try? JSONDecoder().decode(MetricsRecord.self, from: Data(line.utf8)) else { return nil }
        self = record
    }

    /// Every record of a `metrics.jsonl` file, in order; throws naming the first line that is not one.
    public static func read(_ path: String) throws -> [MetricsRecord] {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ReadError.unreadable(path)
        }
        return try text.split(separator: "\n").enumerated().map { index, line in
            guard let record = MetricsRecord(line: line) else { throw ReadError.malformed(path: path, line: index + 1) }
            guard (0...maximumStep).contains(record.step) else {
                throw ReadError.stepOutOfRange(path: path, line: index + 1, step: record.step)
            }
            return record
        }
    }
}
