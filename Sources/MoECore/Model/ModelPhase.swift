extension GPTModel {
    /// The phase the model trains in after `applied` updates: dense until EvoMoE's spawn (the
    /// recipe sets `isDense`), then the gate's own (DTS soft/hard, StableMoE's stages).
    public func phase(afterUpdates applied: Int) -> TrainingPhase {
        guard let layer = moeLayers.first, !layer.isDense else { return .dense }
        return layer.gate.phase(step: applied)
    }

    /// The gate's temperature after `applied` updates (dts, activation_dts; nil for the others).
    public func temperature(afterUpdates applied: Int) -> Double? {
        moeLayers.first?.gate.temperature(step: applied)
    }
}
