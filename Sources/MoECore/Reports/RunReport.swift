import Foundation

/// `moe report RUN_DIR`: one self-contained HTML page (inline SVG, no scripts, no network) with
/// the loss curves, learning rate and temperature, throughput, the experts per token, and a heat
/// map of expert load per MoE layer over time, with the training phases marked.
public enum RunReport {
    public static func html(_ run: RunSummary, config: String) -> String {
        let steps = run.steps.map(Double.init)
        let markers = phaseBoundaries(run)
        func chart(_ title: String, _ yLabel: String, _ series: [LineChart.Series]) -> String {
            var chart = LineChart(title: title, xLabel: "step", yLabel: yLabel, series: series)
            chart.markers = markers
            return chart.svg
        }
        var sections: [String] = []
        sections.append(chart("Loss", "nats per token", [
            .init(name: "training", points: Array(zip(steps, run.losses))),
            .init(name: "validation", points: run.validation.map { (Double($0.step), $0.loss) }),
        ]))
        var schedule = [LineChart.Series(name: "learning rate x 1000", points: Array(zip(steps, run.learningRates.map { $0 * 1000 })))]
        if !run.temperatures.isEmpty { schedule.append(.init(name: "temperature", points: run.temperatures.map { (Double($0.step), $0.value) })) }
        sections.append(chart("Schedules", "value", schedule))
        sections.append(chart("Throughput", "tokens per second", [.init(name: "tokens/s", points: Array(zip(steps, run.tokensPerSecond)))]))
        sections.append(chart("Experts per token", "mean active experts", [.init(name: "active", points: Array(zip(steps, run.activeExperts)))]))
        let layers = run.expertLoad.map(\.count).max() ?? 0
        for layer in 0..<layers { sections.append(heatMap(run, layer: layer)) }
        let final = run.finalValidationLoss.map { String(format: "%.4f", $0) } ?? "-"
        return """
            <!DOCTYPE html>
            <html><head><meta charset="utf-8"><title>SwiftMoE run \(escape(run.name))</title>
            <style>body{font-family:sans-serif;margin:24px;max-width:1500px} .grid{display:flex;flex-wrap:wrap;gap:12px}
            pre{background:#f6f6f6;padding:8px;font-size:11px;max-height:300px;overflow:auto} td,th{padding:2px 10px;text-align:right}</style>
            </head><body>
            <h1>SwiftMoE run: \(escape(run.name))</h1>
            <table><tr><th>logged steps</th><th>last step</th><th>final validation loss</th><th>median tokens/s</th><th>load CV</th><th>dropped</th></tr>
            <tr><td>\(run.steps.count)</td><td>\(run.steps.last ?? 0)</td><td>\(final)</td><td>\(Int(run.medianTokensPerSecond))</td>
            <td>\(String(format: "%.3f", run.loadCoefficientOfVariation))</td><td>\(String(format: "%.4f", run.meanDroppedFraction))</td></tr></table>
            <p>Dashed lines mark phase changes (EvoMoE's dense phase, DTS soft and hard selection, StableMoE's stages).
            Heat maps: each column is a logged step, each row an expert; darker means more of the layer's assignments
            (white: none; the darkest shade is twice the balanced share or more).</p>
            <div class="grid">
            \(sections.joined(separator: "\n"))
            </div>
            <h2>Configuration</h2><pre>\(escape(config))</pre>
            </body></html>
            """
    }

    /// Steps where the logged phase changes.
    static func phaseBoundaries(_ run: RunSummary) -> [(x: Double, label: String)] {
        var markers: [(x: Double, label: String)] = []
        for index in run.phases.indices.dropFirst() where run.phases[index] != run.phases[index - 1] {
            markers.append((Double(run.steps[index]), run.phases[index]))
        }
        return markers
    }

    static func heatMap(_ run: RunSummary, layer: Int) -> String {
        let columns = run.expertLoad.count
        let experts = run.expertLoad.compactMap { $0.count > layer ? $0[layer].count : nil }.max() ?? 0
        let width = 720.0, height = 60.0 + Double(max(experts, 1)) * 18, left = 64.0, top = 36.0
        let cell = (width - left - 20) / Double(max(columns, 1)), rowHeight = 18.0
        var out = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        out += "<text x=\"\(width / 2)\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">Expert load, MoE layer \(layer)</text>\n"
        for expert in 0..<experts {
            out += "<text x=\"\(left - 6)\" y=\"\(top + Double(expert) * rowHeight + 13)\" text-anchor=\"end\">expert \(expert)</text>\n"
        }
        for (column, layers) in run.expertLoad.enumerated() where layers.count > layer {
            let load = layers[layer]
            guard !load.isEmpty else { continue }
            let balanced = 1 / Double(load.count)
            for (expert, share) in load.enumerated() {
                let intensity = min(1, share / (2 * balanced))
                let shade = Int(255 * (1 - intensity))
                out += String(format: "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.1f\" fill=\"rgb(%d,%d,255)\"/>\n",
                              left + Double(column) * cell, top + Double(expert) * rowHeight, cell + 0.3, rowHeight, shade, shade)
            }
        }
        if let first = run.steps.first, let last = run.steps.last {
            out += "<text x=\"\(left)\" y=\"\(height - 8)\">step \(first)</text>\n"
            out += "<text x=\"\(width - 20)\" y=\"\(height - 8)\" text-anchor=\"end\">step \(last)</text>\n"
        }
        for marker in phaseBoundaries(run) {
            guard let index = run.steps.firstIndex(of: Int(marker.x)) else { continue }
            let x = left + Double(index) * cell
            out += "<line x1=\"\(x)\" x2=\"\(x)\" y1=\"\(top)\" y2=\"\(top + Double(experts) * rowHeight)\" stroke=\"#d62728\" stroke-width=\"1.5\" stroke-dasharray=\"4 3\"/>\n"
        }
        return out + "</svg>\n"
    }

    static func escape(_ text: String) -> String { htmlEscape(text) }
}
