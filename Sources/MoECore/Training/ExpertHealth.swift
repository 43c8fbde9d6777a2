/// Watches the experts for collapse and domination (docs/ALGORITHMS.md, "Failure modes"): warns when
/// an expert of a layer has received no tokens for `window` steps in a row, and when one
/// expert takes more than half of a layer's assignments (with 4 or more experts), at most once
/// per expert per window.
public struct ExpertHealth {
    /// [layer][expert]: consecutive steps without tokens.
    var idleSteps: [[Int]] = []
    /// [layer][expert]: the step of the last warning.
    var lastWarning: [[Int]] = []
    var step = 0

    public init() {}

    public static func coefficientOfVariation(_ load: [Double]) -> Double {
        guard !load.isEmpty else { return 0 }
        let mean = load.reduce(0, +) / Double(load.count)
        guard mean > 0 else { return 0 }
        let variance = load.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(load.count)
        return variance.squareRoot() / mean
    }

    public mutating func observe(_ report: StepReport, window: Int, log: (String) -> Void) {
        step = report.step
        for (layer, statistics) in report.moeLayers.enumerated() {
            let load = statistics.expertLoad
            guard !load.isEmpty else { continue }   // EvoMoE's dense phase
            while idleSteps.count <= layer { idleSteps.append([]); lastWarning.append([]) }
            if idleSteps[layer].count != load.count {
                idleSteps[layer] = Array(repeating: 0, count: load.count)
                lastWarning[layer] = Array(repeating: -window, count: load.count)
            }
            for (expert, share) in load.enumerated() {
                idleSteps[layer][expert] = share > 0 ? 0 : idleSteps[layer][expert] + 1
                let due = step - lastWarning[layer][expert] >= window
                if idleSteps[layer][expert] == window && due {
                    log("warning: MoE layer \(layer): expert \(expert) has received no tokens for \(window) steps (collapsed; the balance loss or a higher capacity may revive it)")
                    lastWarning[layer][expert] = step
                } else if load.count >= 4 && share > 0.5 && due {
                    log(String(format: "warning: MoE layer %d: expert %d took %.0f%% of the assignments at step %d (the router favours one expert)",
                               layer, expert, 100 * share, step))
                    lastWarning[layer][expert] = step
                }
            }
        }
    }
}
