import Foundation

/// What a finished run's `metrics.jsonl` says, for comparisons and reports.
public struct RunSummary {
    public var name: String
    public var steps: [Int] = []
    public var losses: [Double] = []
    public var validation: [(step: Int, loss: Double)] = []
    public var tokensPerSecond: [Double] = []
    /// Per logged step: per MoE layer, the fraction of assignments each expert received
    /// (empty rows in EvoMoE's dense phase).
    public var expertLoad: [[[Double]]] = []
    public var droppedFraction: [Double] = []
    public var activeExperts: [Double] = []
    public var learningRates: [Double] = []
    public var temperatures: [(step: Int, value: Double)] = []
    public var phases: [String] = []

    public enum ReadError: Error, CustomStringConvertible {
        case unreadable(String)
        case malformed(path: String, line: Int)
        public var description: String {
            switch self {
            case let .unreadable(path): return "run summary: cannot read '\(path)'"
            case let .malformed(path, line): return "run summary: '\(path)' line \(line) is not a metrics object"
            }
        }
    }

    /// Reads `runDirectory/metrics.jsonl`.
    public init(runDirectory: String, name: String? = nil) throws {
        self.name = name ?? (runDirectory as NSString).lastPathComponent
        let path = (runDirectory as NSString).appendingPathComponent("metrics.jsonl")
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ReadError.unreadable(path)
        }
        for (index, line) in text.split(separator: "\n").enumerated() {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let step = object["step"] as? Int else { throw ReadError.malformed(path: path, line: index + 1) }
            if let loss = object["val_loss"] as? Double { validation.append((step, loss)); continue }
            guard let loss = object["loss"] as? Double else { continue }
            steps.append(step)
            losses.append(loss)
            tokensPerSecond.append(object["tokens_per_sec"] as? Double ?? 0)
            expertLoad.append(object["expert_load"] as? [[Double]] ?? [])
            droppedFraction.append(object["dropped_fraction"] as? Double ?? 0)
            activeExperts.append(object["active_experts"] as? Double ?? 0)
            learningRates.append(object["lr"] as? Double ?? 0)
            phases.append(object["phase"] as? String ?? "")
            if let temperature = object["temperature"] as? Double { temperatures.append((step, temperature)) }
        }
    }

    public var finalValidationLoss: Double? { validation.last?.loss }

    /// Median tokens/s over logged steps after the first (which includes warm-up).
    public var medianTokensPerSecond: Double {
        let values = tokensPerSecond.dropFirst().sorted()
        return values.isEmpty ? (tokensPerSecond.first ?? 0) : values[values.count / 2]
    }

    /// Mean over logged sparse steps and MoE layers of the coefficient of variation (std / mean)
    /// of the expert load: 0 is perfectly balanced.
    public var loadCoefficientOfVariation: Double {
        var total = 0.0, count = 0
        for layers in expertLoad {
            for load in layers where load.contains(where: { $0 > 0 }) {
                total += ExpertHealth.coefficientOfVariation(load)
                count += 1
            }
        }
        return count == 0 ? 0 : total / Double(count)
    }

    public var meanDroppedFraction: Double { droppedFraction.isEmpty ? 0 : droppedFraction.reduce(0, +) / Double(droppedFraction.count) }
    public var meanActiveExperts: Double { activeExperts.isEmpty ? 0 : activeExperts.reduce(0, +) / Double(activeExperts.count) }
}

/// A minimal SVG line chart (no dependencies, opens in any browser).
public struct LineChart {
    public struct Series {
        public var name: String
        public var points: [(x: Double, y: Double)]
        public init(name: String, points: [(x: Double, y: Double)]) { self.name = name; self.points = points }
    }

    public var title: String
    public var xLabel: String
    public var yLabel: String
    public var series: [Series]
    /// Vertical dashed lines (phase boundaries), with labels.
    public var markers: [(x: Double, label: String)] = []
    public var width = 720.0
    public var height = 420.0

    public init(title: String, xLabel: String, yLabel: String, series: [Series]) {
        self.title = title; self.xLabel = xLabel; self.yLabel = yLabel; self.series = series
    }

    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

    public var svg: String {
        let points = series.flatMap(\.points).filter { $0.y.isFinite }
        let left = 64.0, right = 150.0, top = 36.0, bottom = 48.0
        let plotWidth = width - left - right, plotHeight = height - top - bottom
        let minX = points.map(\.x).min() ?? 0, maxX = max(points.map(\.x).max() ?? 1, minX + 1)
        var minY = points.map(\.y).min() ?? 0, maxY = points.map(\.y).max() ?? 1
        if maxY - minY < 1e-9 { maxY += 0.5; minY -= 0.5 }
        func px(_ x: Double) -> Double { left + (x - minX) / (maxX - minX) * plotWidth }
        func py(_ y: Double) -> Double { top + (maxY - y) / (maxY - minY) * plotHeight }
        var out = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        out += "<text x=\"\(width / 2)\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">\(escape(title))</text>\n"
        out += "<rect x=\"\(left)\" y=\"\(top)\" width=\"\(plotWidth)\" height=\"\(plotHeight)\" fill=\"none\" stroke=\"#999\"/>\n"
        for tick in 0...4 {
            let y = minY + (maxY - minY) * Double(tick) / 4, x = minX + (maxX - minX) * Double(tick) / 4
            out += "<line x1=\"\(left)\" x2=\"\(left + plotWidth)\" y1=\"\(py(y))\" y2=\"\(py(y))\" stroke=\"#eee\"/>\n"
            out += "<text x=\"\(left - 6)\" y=\"\(py(y) + 4)\" text-anchor=\"end\">\(String(format: "%.3g", y))</text>\n"
            out += "<text x=\"\(px(x))\" y=\"\(top + plotHeight + 16)\" text-anchor=\"middle\">\(String(format: "%.0f", x))</text>\n"
        }
        out += "<text x=\"\(left + plotWidth / 2)\" y=\"\(height - 8)\" text-anchor=\"middle\">\(escape(xLabel))</text>\n"
        out += "<text x=\"14\" y=\"\(top + plotHeight / 2)\" text-anchor=\"middle\" transform=\"rotate(-90 14 \(top + plotHeight / 2))\">\(escape(yLabel))</text>\n"
        for marker in markers where marker.x >= minX && marker.x <= maxX {
            out += "<line x1=\"\(px(marker.x))\" x2=\"\(px(marker.x))\" y1=\"\(top)\" y2=\"\(top + plotHeight)\" stroke=\"#555\" stroke-dasharray=\"4 3\"/>\n"
            out += "<text x=\"\(px(marker.x) + 3)\" y=\"\(top + 12)\" fill=\"#555\">\(escape(marker.label))</text>\n"
        }
        for (index, line) in series.enumerated() {
            let color = LineChart.palette[index % LineChart.palette.count]
            let path = line.points.filter { $0.y.isFinite }.map { String(format: "%.1f,%.1f", px($0.x), py($0.y)) }.joined(separator: " ")
            out += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(path)\"/>\n"
            let legendY = top + 10 + Double(index) * 18
            out += "<line x1=\"\(left + plotWidth + 12)\" x2=\"\(left + plotWidth + 32)\" y1=\"\(legendY)\" y2=\"\(legendY)\" stroke=\"\(color)\" stroke-width=\"3\"/>\n"
            out += "<text x=\"\(left + plotWidth + 38)\" y=\"\(legendY + 4)\">\(escape(line.name))</text>\n"
        }
        return out + "</svg>\n"
    }

    func escape(_ text: String) -> String { htmlEscape(text) }
}

/// Text made safe inside SVG and HTML.
func htmlEscape(_ text: String) -> String {
    text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
}

/// The gate comparison: a Markdown table and a chart of the validation curves.
public enum GateComparison {
    public static func table(_ runs: [RunSummary]) -> String {
        var lines = ["| run | final val loss | best val loss | tokens/s | load CV | dropped | experts/token |",
                     "|---|---|---|---|---|---|---|"]
        for run in runs {
            let final = run.finalValidationLoss.map { String(format: "%.4f", $0) } ?? "-"
            let best = run.validation.map(\.loss).min().map { String(format: "%.4f", $0) } ?? "-"
            lines.append("| \(run.name) | \(final) | \(best) | \(Int(run.medianTokensPerSecond)) | "
                         + String(format: "%.3f | %.3f | %.2f |", run.loadCoefficientOfVariation, run.meanDroppedFraction, run.meanActiveExperts))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    public static func chart(_ runs: [RunSummary]) -> String {
        LineChart(title: "Validation loss", xLabel: "step", yLabel: "nats per token",
                  series: runs.map { run in .init(name: run.name, points: run.validation.map { (Double($0.step), $0.loss) }) }).svg
    }
}
