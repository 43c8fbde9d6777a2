#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// One JSON object, keys in insertion order (so `metrics.jsonl` reads naturally).
public struct JSONObject {
    private var fields: [String] = []
    public init() {}

    public mutating func add(_ key: String, _ value: Int) { fields.append("\"\(key)\":\(value)") }
    public mutating func add(_ key: String, _ value: Double) { fields.append("\"\(key)\":\(JSONObject.number(value))") }
    public mutating func add(_ key: String, _ value: String) { fields.append("\"\(key)\":\(JSONObject.string(value))") }
    public mutating func add(_ key: String, _ values: [Double]) {
        fields.append("\"\(key)\":[\(values.map(JSONObject.number).joined(separator: ","))]")
    }
    public mutating func add(_ key: String, _ rows: [[Double]]) {
        fields.append("\"\(key)\":[\(rows.map { "[\($0.map(JSONObject.number).joined(separator: ","))]" }.joined(separator: ","))]")
    }

    /// A value that is already JSON (a nested object).
    public mutating func addRaw(_ key: String, _ json: String) { fields.append("\"\(key)\":\(json)") }

    public var text: String { "{" + fields.joined(separator: ",") + "}" }

    /// Shortest round-trip decimal; JSON has no NaN or infinity, so those become null.
    static func number(_ value: Double) -> String { value.isFinite ? "\(value)" : "null" }

    static func string(_ text: String) -> String {
        var escaped = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": escaped += "\\\""
            case "\\": escaped += "\\\\"
            case "\n": escaped += "\\n"
            case _ where scalar.value < 0x20: escaped += String(format: "\\u%04x", scalar.value)
            default: escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped + "\""
    }
}

/// `RUN_DIR/metrics.jsonl`: one record per line, each written with one `write` call so a crash
/// never leaves a half-flushed buffer behind, and a failed write (a full disk) never leaves a cut
/// line: the file is cut back to its last whole line and the failure is reported, not trapped.
public final class MetricsLog {
    public let path: String
    private let descriptor: Int32

    public struct WriteError: Error, CustomStringConvertible {
        public let path: String
        public let reason: String
        public var description: String { "metrics '\(path)': cannot write a record (\(reason)); the line is left out" }
    }

    /// Opens for appending. When resuming at `resumeStep`, records from steps at or after it
    /// (written by the interrupted run after its last checkpoint) are dropped first, so the file
    /// describes one consistent history.
    public init(path: String, resumeStep: Int?) throws {
        self.path = path
        if let resumeStep, let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) {
            let kept = text.split(separator: "\n").filter { line in
                guard let record = MetricsRecord(line: line) else { return false }
                return record.step < resumeStep
            }
            let rewritten = kept.map { $0 + "\n" }.joined()
            try Data(rewritten.utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
        }
        let flags = O_WRONLY | O_CREAT | O_APPEND | (resumeStep == nil ? O_TRUNC : 0)
        descriptor = open(path, flags, 0o644)
        guard descriptor >= 0 else {
            throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path, NSLocalizedDescriptionKey: String(cString: strerror(errno))])
        }
    }

    /// Appends `record` as one line, whole or not at all.
    public func write(_ record: MetricsRecord) throws {
        let line = Array((record.jsonLine + "\n").utf8)
        let before = lseek(descriptor, 0, SEEK_END)
        var written = 0
        while written < line.count {
            let result = line[written...].withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) }
            if result < 0 && errno == EINTR { continue }
            guard result > 0 else {
                let reason = result < 0 ? String(cString: strerror(errno)) : "nothing written"
                if before >= 0 { _ = ftruncate(descriptor, before) }
                throw WriteError(path: path, reason: reason)
            }
            written += result
        }
    }

    deinit { close(descriptor) }
}
