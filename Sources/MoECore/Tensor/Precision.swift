import MoEIO

/// The number format of the large matrix products (`train.precision`).
///
/// - fp32: every product in fp32, through OpenBLAS `cblas_sgemm` or oneDNN's matmul, whichever
///   measured faster on the model's shapes (`KernelChoice`, `train.kernel`).
/// - bf16: the inputs of the large products (activations and weights: attention's QKV,
///   projection and per-head products, the experts and dense FFNs, the output head) are rounded
///   to bfloat16 (round to nearest even) and multiplied by oneDNN with fp32 accumulation and
///   fp32 outputs. Master weights, gradients and AdamW moments stay fp32; so do softmax, layer
///   norm, GELU, the loss and the router logits (routing decisions must not flip on rounding).
///   The bf16 copies of the weights are made once per forward pass (once per optimizer step in
///   training), never per product.
/// `train.precision: auto` takes bf16 only where it measured clearly faster (`KernelChoice`).
public enum Precision: String, Sendable, CaseIterable {
    case fp32, bf16
}
