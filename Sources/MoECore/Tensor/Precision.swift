import MoEIO

/// The number format of the large matrix products (`train.precision`).
///
/// - fp32: every product through OpenBLAS `cblas_sgemm`.
/// - bf16: the inputs of the large products (activations and weights: attention's QKV,
///   projection and per-head products, the experts and dense FFNs, the output head) are rounded
///   to bfloat16 (round to nearest even) and multiplied by oneDNN with fp32 accumulation and
///   fp32 outputs. Master weights, gradients and AdamW moments stay fp32; so do softmax, layer
///   norm, GELU, the loss and the router logits (routing decisions must not flip on rounding).
///   The bf16 copies of the weights are made once per forward pass (once per optimizer step in
///   training), never per product.
public enum Precision: String, Sendable, CaseIterable {
    case fp32, bf16

    /// Resolves `train.precision` (auto, fp32 or bf16) on this CPU. `auto` becomes bf16 where
    /// oneDNN reports bf16 support and fp32 otherwise, with a note saying why; an explicit bf16
    /// on a CPU without it is an error naming the missing feature.
    public static func resolve(_ requested: PrecisionSetting, support: BFloat16Support = .current) throws -> (Precision, note: String?) {
        switch requested {
        case .fp32: return (.fp32, nil)
        case .bf16:
            guard support.supported else { throw PrecisionError.unsupported(isa: support.isa) }
            return (.bf16, nil)
        case .auto:
            if support.supported { return (.bf16, nil) }
            return (.fp32, "precision auto: fp32, because this CPU lacks AVX512-BF16/AMX (oneDNN's instruction set is \(support.isa))")
        }
    }
}
