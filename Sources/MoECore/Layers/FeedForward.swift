/// The expert MLP: y = GELU(x W1 + b1) W2 + b2. x, y: [N, C]; hidden: [N, H].
/// A dense FFN block is one of these; an MoE layer holds one per expert.
public struct FeedForward<T: Scalar, Kind> {
    public let up: Linear<T, Kind>     // [C, H]
    public let down: Linear<T, Kind>   // [H, C]

    public var width: Int { up.inputSize }
    public var hiddenSize: Int { up.outputSize }

    public init(store: ParameterStore<T, Kind>, name: String, width: Int, hiddenSize: Int, residualDeviation: Double) {
        up = Linear(store: store, name: "\(name).up", inputSize: width, outputSize: hiddenSize, deviation: 0.02)
        down = Linear(store: store, name: "\(name).down", inputSize: hiddenSize, outputSize: width,
                      deviation: residualDeviation)
    }

    /// preActivation, activation: [rows, H], the caller's storage (kept for backward).
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>,
                        preActivation: UnsafeMutablePointer<T>, activation: UnsafeMutablePointer<T>) {
        up.forward(x, rows: rows, into: preActivation)
        Kernels.geluForward(preActivation, activation, count: rows * hiddenSize)
        down.forward(activation, rows: rows, into: y)
    }

    /// Adjoint; `scratch` [rows, H] receives dHidden. dx is accumulated.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>,
                         preActivation: UnsafePointer<T>, activation: UnsafePointer<T>, scratch: UnsafeMutablePointer<T>) {
        scratch.update(repeating: 0, count: rows * hiddenSize)
        down.backward(activation, dy, rows: rows, dx: scratch)
        Kernels.geluBackward(preActivation, scratch, scratch, count: rows * hiddenSize)
        up.backward(x, scratch, rows: rows, dx: dx)
    }
}
