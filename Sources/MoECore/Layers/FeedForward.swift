import MoEIO

/// The expert MLP: y = GELU(x W1 + b1) W2 + b2 (gpt2), or SwiGLU without biases (llama):
/// y = (silu(x W_gate) ⊙ x W_up) W_down, with W_gate and W_up one [C, 2H] weight (gate columns
/// first), so the up projection is one product. x, y: [N, C]; hidden: [N, H].
/// A dense FFN block is one of these; an MoE layer holds one per expert.
///
/// In Float the hidden layer's element-wise work is one pass each way (`FloatKernels`):
/// forward adds b1, applies GELU and, in bf16 mode, writes the activation's bf16 copy, which
/// both the down projection and its weight gradient multiply with; backward applies GELU',
/// sums b1's gradient and writes dHidden's bf16 copy for the up projection's two products.
/// Double (the gradient checks) runs the same steps one pass at a time.
public struct FeedForward<T: Scalar, Kind> {
    public let up: Linear<T, Kind>     // [C, H]; SwiGLU [C, 2H]
    public let down: Linear<T, Kind>   // [H, C]
    public let gated: Bool

    public var width: Int { up.inputSize }
    public var hiddenSize: Int { down.inputSize }
    /// Columns of the pre-activation: H, or 2H for SwiGLU (gate, then up).
    public var preActivationSize: Int { up.outputSize }
    /// Columns per row of backward's scratch: dPre, and for SwiGLU dHidden after it.
    public var scratchColumns: Int { gated ? 3 * hiddenSize : hiddenSize }
    /// Parameters of one: the two (SwiGLU: three) matrices and the biases.
    public static func parameterCount(width: Int, hiddenSize: Int, architecture: Architecture) -> Int {
        architecture == .llama ? 3 * width * hiddenSize : 2 * width * hiddenSize + hiddenSize + width
    }

    public init(store: ParameterStore<T, Kind>, path: ParameterPath, width: Int, hiddenSize: Int, residualDeviation: Double,
                architecture: Architecture = .gpt2) {
        gated = architecture == .llama
        up = Linear(store: store, path: path.appending("up"), inputSize: width, outputSize: gated ? 2 * hiddenSize : hiddenSize,
                    deviation: 0.02, bias: !gated)
        down = Linear(store: store, path: path.appending("down"), inputSize: hiddenSize, outputSize: width,
                      deviation: residualDeviation, bias: !gated)
    }

    /// hidden: the caller's storage for `rows` rows, kept for backward.
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, hidden: FeedForwardHidden<T>) {
        if gated { return forwardGated(x, rows: rows, into: y, hidden: hidden) }
        guard T.self == Float.self, let bias = up.bias else {
            up.forward(x, rows: rows, into: hidden.preActivation)
            Kernels.geluForward(hidden.preActivation, hidden.activation, count: rows * hiddenSize)
            return down.forward(hidden.activation, rows: rows, into: y)
        }
        up.forward(hidden.inputOperand(x), rows: rows, into: hidden.preActivation, addingBias: false)
        FloatKernels.biasGELU(asFloat(hidden.preActivation), bias: asFloat(UnsafePointer(bias.value)), rows: rows, columns: hiddenSize,
                              activation: floatValues(hidden.activation, rows: rows, hidden: hidden), rounded: hidden.roundedActivation)
        down.forward(hidden.activationOperand, rows: rows, into: y, addingBias: true)
    }

    /// Adjoint; `scratch` [rows, scratchColumns] receives dHidden. dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>,
                         hidden: FeedForwardHidden<T>, scratch: UnsafeMutablePointer<T>) {
        backwardInput(dy, rows: rows, dx: dx, hidden: hidden, scratch: scratch)
        backwardWeights(x, dy, rows: rows, hidden: hidden, scratch: scratch)
    }

    /// The input's half of the adjoint: dx = dPre W1ᵀ + dxBeta dx (added by default). Leaves
    /// dPre in `scratch` and, in bf16 mode, dPre's and dy's bf16 copies in `hidden`, for
    /// `backwardWeights`. An MoE layer sends dx on before it computes the weights' half, which no
    /// other rank waits for.
    public func backwardInput(_ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>,
                              hidden: FeedForwardHidden<T>, scratch: UnsafeMutablePointer<T>, dxBeta: T = 1) {
        if gated { return backwardInputGated(dy, rows: rows, dx: dx, hidden: hidden, scratch: scratch, dxBeta: dxBeta) }
        // dy rounded once into `hidden`'s copy (both of the down projection's products use it), b2's
        // gradient summed in the same pass in Float; dHidden = dy W2ᵀ written (not added) into the
        // scratch: no zeroing pass.
        let dyOperand = down.outputGradientOperand(dy, rows: rows, roundingInto: hidden.roundedOutputGradient, summingBias: sumsBiasesInPasses)
        down.backwardInput(dyOperand, rows: rows, dx: scratch, dxBeta: 0)
        guard T.self == Float.self, let bias = up.bias else {
            Kernels.geluBackward(hidden.preActivation, scratch, scratch, count: rows * hiddenSize)
            return up.backwardInput(.values(scratch), rows: rows, dx: dx, dxBeta: dxBeta)
        }
        // dPre = dHidden GELU'(pre), db1 = Σ_rows dPre, and dPre's bf16 copy, in one pass.
        FloatKernels.geluBackwardBias(asFloat(UnsafePointer(hidden.preActivation)), asFloat(scratch), rows: rows, columns: hiddenSize,
                                      biasGradient: asFloat(bias.gradient), rounded: hidden.roundedPreGradient,
                                      keepsFloat: writesFloatValues(rows: rows, hidden: hidden))
        up.backwardInput(hidden.preGradientOperand(scratch), rows: rows, dx: dx, dxBeta: dxBeta)
    }

    /// The weights' half of the adjoint, after `backwardInput` with the same `hidden` and
    /// `scratch`: dW2 += aᵀ dy, dW1 += xᵀ dPre, and the biases' gradients where `backwardInput`'s
    /// fused passes did not sum them (Double).
    public func backwardWeights(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int,
                                hidden: FeedForwardHidden<T>, scratch: UnsafeMutablePointer<T>) {
        for projection in Projection.allCases { backwardWeights(of: projection, x, dy, rows: rows, hidden: hidden, scratch: scratch) }
    }

    /// The two weight products of `backwardWeights`, apart (an MoE layer runs them one at a time).
    public enum Projection: CaseIterable { case down, up }

    /// One projection's part of `backwardWeights`; without `accumulate` its weight gradient is
    /// overwritten (`Linear.backwardWeights`).
    public func backwardWeights(of projection: Projection, _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int,
                                hidden: FeedForwardHidden<T>, scratch: UnsafeMutablePointer<T>, accumulate: Bool = true) {
        switch projection {
        case .down:
            let dyOperand = ProductOperand.prerounded(dy, hidden.roundedOutputGradient.map { UnsafePointer($0) })
            down.backwardWeights(hidden.activationOperand, dyOperand, rows: rows, biasGradient: !sumsBiasesInPasses, accumulate: accumulate)
        case .up:
            up.backwardWeights(hidden.inputOperand(x), hidden.preGradientOperand(scratch), rows: rows, biasGradient: !sumsBiasesInPasses,
                               accumulate: accumulate)
        }
    }

    /// The linear layer of `projection`.
    public func linear(of projection: Projection) -> Linear<T, Kind> { projection == .down ? down : up }

    /// Whether `backwardInput`'s element-wise passes sum the biases' gradients (Float with biases).
    private var sumsBiasesInPasses: Bool { T.self == Float.self && up.bias != nil }

    /// Whether the products over `rows` rows read their operands' fp32 values (the input x, the
    /// activation, dPre): not in bf16 mode with more than one row, where they read only the bf16
    /// copies (`readsFloatValues`; both projections run on their store's one engine).
    public func readsFloatOperands(rows: Int) -> Bool { readsFloatValues(up.weight.store.matmul, m: min(rows, width, hiddenSize)) }

    /// Whether a fused pass over `rows` rows writes the fp32 activation or dPre: where a product
    /// reads them, or no bf16 copy is kept. Skipping them saves a store of [rows, H] floats a
    /// pass (configs/bench.yaml: about 18 MB a step each way).
    private func writesFloatValues(rows: Int, hidden: FeedForwardHidden<T>) -> Bool {
        hidden.roundedActivation == nil || readsFloatOperands(rows: rows)
    }

    /// `values` as a fused pass's fp32 output, or nil where it writes only the bf16 copy.
    private func floatValues(_ values: UnsafeMutablePointer<T>, rows: Int, hidden: FeedForwardHidden<T>) -> UnsafeMutablePointer<Float>? {
        writesFloatValues(rows: rows, hidden: hidden) ? asFloat(values) : nil
    }
}

extension FeedForward {
    /// SwiGLU forward: pre = x [W_gate | W_up], a = silu(g) u (with a's bf16 copy), y = a W_down.
    func forwardGated(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>, hidden: FeedForwardHidden<T>) {
        up.forward(hidden.inputOperand(x), rows: rows, into: hidden.preActivation, addingBias: false)
        if T.self == Float.self {
            FloatKernels.swiGLU(asFloat(UnsafePointer(hidden.preActivation)), rows: rows, hidden: hiddenSize,
                                activation: floatValues(hidden.activation, rows: rows, hidden: hidden), rounded: hidden.roundedActivation)
        } else {
            Kernels.swiGLUForward(hidden.preActivation, rows: rows, hidden: hiddenSize, activation: hidden.activation)
        }
        down.forward(hidden.activationOperand, rows: rows, into: y, addingBias: false)
    }

    /// SwiGLU's input half of the adjoint. scratch: dPre [rows, 2H], then dHidden [rows, H].
    func backwardInputGated(_ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>,
                            hidden: FeedForwardHidden<T>, scratch: UnsafeMutablePointer<T>, dxBeta: T) {
        let dPre = scratch, dHidden = scratch + rows * 2 * hiddenSize
        // dy rounded once into `hidden`'s copy (both of the down projection's products use it).
        let dyOperand = down.outputGradientOperand(dy, rows: rows, roundingInto: hidden.roundedOutputGradient, summingBias: false)
        down.backwardInput(dyOperand, rows: rows, dx: dHidden, dxBeta: 0)
        if T.self == Float.self {
            FloatKernels.swiGLUBackward(asFloat(UnsafePointer(hidden.preActivation)), asFloat(UnsafePointer(dHidden)), rows: rows,
                                        hidden: hiddenSize, dPre: floatValues(dPre, rows: rows, hidden: hidden),
                                        rounded: hidden.roundedPreGradient)
        } else {
            Kernels.swiGLUBackward(hidden.preActivation, dHidden, rows: rows, hidden: hiddenSize, dPre: dPre)
        }
        up.backwardInput(hidden.preGradientOperand(dPre), rows: rows, dx: dx, dxBeta: dxBeta)
    }
}

/// A feed-forward pass's hidden layer, [rows, H] each, in the caller's storage: what backward
/// needs (the pre-activation for GELU', the activation for the down projection's weight
/// gradient, and in bf16 mode the activation's bf16 copy that both products use).
public struct FeedForwardHidden<T: Scalar> {
    public let preActivation: UnsafeMutablePointer<T>
    public let activation: UnsafeMutablePointer<T>
    public let roundedActivation: UnsafeMutablePointer<BFloat16>?
    /// Backward's bf16 copies in bf16 mode: dy [rows, C] and dPre [rows, H (SwiGLU 2H)], written
    /// by `backwardInput` and read again by `backwardWeights`.
    public let roundedOutputGradient: UnsafeMutablePointer<BFloat16>?
    public let roundedPreGradient: UnsafeMutablePointer<BFloat16>?
    /// x's bf16 copy [rows, C] where the caller made one as it wrote x (an MoE layer's fan-out),
    /// for the up projection's forward and weight gradient; nil: rounded by each product.
    public var roundedInput: UnsafePointer<BFloat16>? = nil

    /// x as the up projection's operand.
    func inputOperand(_ x: UnsafePointer<T>) -> ProductOperand<T> { .prerounded(x, roundedInput) }

    var activationOperand: ProductOperand<T> { .prerounded(activation, roundedActivation.map { UnsafePointer($0) }) }
    /// dPre (in backward's scratch) with its bf16 copy.
    func preGradientOperand(_ dPre: UnsafeMutablePointer<T>) -> ProductOperand<T> {
        .prerounded(dPre, roundedPreGradient.map { UnsafePointer($0) })
    }
}

/// Storage for `FeedForwardHidden` of up to `rows` rows, grown as needed; MoE layers take views
/// of consecutive row blocks, one per expert.
public final class FeedForwardStorage<T: Scalar> {
    let preActivation = Tensor<T>(), activation = Tensor<T>()
    let roundedActivation = BFloat16Buffer(), roundedOutputGradient = BFloat16Buffer(), roundedPreGradient = BFloat16Buffer()
    private var keepsRoundedCopy = false
    private var width = 0, hiddenSize = 0, preActivationSize = 0

    public init() {}

    /// Room for `rows` rows of `feedForward`'s hidden layer; rounded: whether products run in
    /// bf16 (the activation's bf16 copy is kept).
    public func resize<Kind>(rows: Int, for feedForward: FeedForward<T, Kind>, rounded: Bool) {
        let hiddenSize = feedForward.hiddenSize, preActivationSize = feedForward.preActivationSize
        preActivation.resize(rows: rows, columns: preActivationSize)
        activation.resize(rows: rows, columns: hiddenSize)
        if rounded {
            roundedActivation.reserve(rows * hiddenSize)
            roundedOutputGradient.reserve(rows * feedForward.width)
            roundedPreGradient.reserve(rows * preActivationSize)
        }
        (keepsRoundedCopy, width, self.hiddenSize, self.preActivationSize) = (rounded, feedForward.width, hiddenSize, preActivationSize)
    }

    /// The view of rows from `start` on.
    public func hidden(fromRow start: Int = 0) -> FeedForwardHidden<T> {
        let offset = start * hiddenSize
        return FeedForwardHidden(preActivation: preActivation.pointer + start * preActivationSize, activation: activation.pointer + offset,
                                 roundedActivation: keepsRoundedCopy ? roundedActivation.pointer + offset : nil,
                                 roundedOutputGradient: keepsRoundedCopy ? roundedOutputGradient.pointer + start * width : nil,
                                 roundedPreGradient: keepsRoundedCopy ? roundedPreGradient.pointer + start * preActivationSize : nil)
    }
}
