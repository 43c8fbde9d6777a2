import Foundation
import MoEIO

/// What a finished run's `metrics.jsonl` says, for comparisons and reports.
public struct RunSummary {
    public var name: String
    /// The resolved config the run wrote (nil for a run directory without `config.yaml`).
    public var config: RunConfig?
    public var steps: [Int] = []
    public var losses: [Double] = []
    /// Validation losses with the training compute spent before them (nil in older runs).
    public var validation: [(step: Int, loss: Double, flops: Double?)] = []
    public var tokensPerSecond: [Double] = []
    /// Per logged step: per MoE layer, the fraction of assignments each expert received
    /// (empty rows in EvoMoE's dense phase).
    public var expertLoad: [[[Double]]] = []
    public var droppedFraction: [Double] = []
    public var activeExperts: [Double] = []
    public var learningRates: [Double] = []
    public var temperatures: [(step: Int, value: Double)] = []
    public var phases: [String] = []
    /// Model FLOPs and seconds of training at the last logged step (nil in older runs).
    public var trainingFlops: Double?
    public var trainingSeconds: Double?

    /// Reads `runDirectory/metrics.jsonl` (and `config.yaml`, when there). The name is the
    /// directory's, or its parent's for a directory named `seed<N>` (runs/compare/hash/seed2 is "hash").
    public init(runDirectory: String, name: String? = nil) throws {
        let directory = (runDirectory as NSString).standardizingPath as NSString
        let last = directory.lastPathComponent
        let isSeedDirectory = last.hasPrefix("seed") && !last.dropFirst(4).isEmpty && last.dropFirst(4).allSatisfy(\.isNumber)
        self.name = name ?? (isSeedDirectory ? (directory.deletingLastPathComponent as NSString).lastPathComponent : last)
        let configPath = directory.appendingPathComponent("config.yaml")
        if let text = try? String(contentsOfFile: configPath, encoding: .utf8) {
            config = try RunConfig.fromResolved(text, file: configPath)
        }
        for record in try MetricsRecord.read(directory.appendingPathComponent("metrics.jsonl")) {
            let step = record.step
            if let loss = record.validationLoss { validation.append((step, loss, record.trainingFlops)); continue }
            // Skipped steps (a non-finite loss) are left out.
            guard record.isTrainingStep, let loss = record.loss else { continue }
            steps.append(step)
            losses.append(loss)
            tokensPerSecond.append(record.tokensPerSecond ?? 0)
            expertLoad.append(record.expertLoad ?? [])
            droppedFraction.append(record.droppedFraction ?? 0)
            activeExperts.append(record.activeExperts ?? 0)
            learningRates.append(record.learningRate ?? 0)
            phases.append(record.phase?.rawValue ?? "")
            if let temperature = record.temperature { temperatures.append((step, temperature)) }
            if let flops = record.trainingFlops { trainingFlops = flops }
            if let seconds = record.trainingSeconds { trainingSeconds = seconds }
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

    /// Whether the run logged MoE statistics (a dense model has none).
    public var hasMoELayers: Bool { expertLoad.contains { !$0.isEmpty } }

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

    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                          "#7f7f7f", "#bcbd22", "#000000", "#aec7e8"]

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

/// The gate comparison: a Markdown table and charts of the validation curves. Runs whose
/// configs differ only in `train.seed` are one row: the mean and sample standard deviation over
/// the seeds (curves: the mean).
public enum GateComparison {
    /// Runs of one setting, in the order given.
    public struct Group {
        public var runs: [RunSummary]
        public var name: String { runs[0].name }

        /// Mean and sample standard deviation (0 for one value).
        static func spread(_ values: [Double]) -> (mean: Double, sd: Double) {
            let mean = values.reduce(0, +) / Double(values.count)
            guard values.count > 1 else { return (mean, 0) }
            return (mean, (values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(values.count - 1)).squareRoot())
        }

        func cell(_ value: (RunSummary) -> Double?, format: String) -> String {
            let values = runs.compactMap(value)
            guard values.count == runs.count else { return "-" }
            let (mean, sd) = Group.spread(values)
            return runs.count > 1 ? String(format: "\(format) ± \(format)", mean, sd) : String(format: format, mean)
        }

        func mean(_ value: (RunSummary) -> Double) -> Double { Group.spread(runs.map(value)).mean }

        /// The mean validation curve over the seeds, at the evaluations every run has.
        func meanCurve(x: (RunSummary, Int) -> Double?) -> [(x: Double, y: Double)] {
            let count = runs.map(\.validation.count).min() ?? 0
            return (0..<count).compactMap { index in
                let xs = runs.compactMap { x($0, index) }
                guard xs.count == runs.count else { return nil }
                return (xs.reduce(0, +) / Double(xs.count), mean { $0.validation[index].loss })
            }
        }
    }

    public static func groups(_ runs: [RunSummary]) -> [Group] {
        var groups: [Group] = []
        for run in runs {
            let index = groups.firstIndex { group in
                guard let mine = run.config, let theirs = group.runs[0].config else { return false }
                return mine.differingKeys(from: theirs).allSatisfy { $0 == "train.seed" }
            }
            if let index { groups[index].runs.append(run) } else { groups.append(Group(runs: [run])) }
        }
        return groups
    }

    public static func table(_ runs: [RunSummary]) -> String {
        var lines = ["| run | seeds | steps | compute (TFLOP) | final val loss | best val loss | tokens/s | training time | load CV | dropped | experts/token |",
                     "|---|---|---|---|---|---|---|---|---|---|---|"]
        for group in groups(runs) {
            let steps = Set(group.runs.compactMap { $0.steps.last.map { $0 + 1 } })
            let cells = [
                group.name, "\(group.runs.count)", steps.count == 1 ? "\(steps.first!)" : steps.sorted().map(String.init).joined(separator: "/"),
                group.cell({ $0.trainingFlops.map { $0 / 1e12 } }, format: "%.2f"),
                group.cell(\.finalValidationLoss, format: "%.4f"),
                group.cell({ $0.validation.map(\.loss).min() }, format: "%.4f"),
                "\(Int(group.mean(\.medianTokensPerSecond)))",
                group.runs.allSatisfy { $0.trainingSeconds != nil } ? duration(group.mean { $0.trainingSeconds ?? 0 }) : "-",
            ] + [(\RunSummary.loadCoefficientOfVariation, "%.3f"), (\.meanDroppedFraction, "%.3f"), (\.meanActiveExperts, "%.2f")].map { statistic, format in
                // A dense model has no experts to balance, drop or count.
                group.runs.allSatisfy(\.hasMoELayers) ? String(format: format, group.mean { $0[keyPath: statistic] }) : "-"
            }
            lines.append("| " + cells.joined(separator: " | ") + " |")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Validation loss against steps, or against training compute (TFLOP) when `byCompute`.
    public static func chart(_ runs: [RunSummary], byCompute: Bool = false) -> String {
        let groups = self.groups(runs)
        let series = groups.map { group in
            LineChart.Series(name: group.name, points: group.meanCurve { run, index in
                byCompute ? run.validation[index].flops.map { $0 / 1e12 } : Double(run.validation[index].step)
            })
        }
        return LineChart(title: "Validation loss" + (runs.count > groups.count ? " (mean over seeds)" : ""),
                         xLabel: byCompute ? "training compute (TFLOP)" : "step", yLabel: "nats per token", series: series).svg
    }
}
