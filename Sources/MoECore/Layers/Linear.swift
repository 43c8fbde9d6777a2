/// y = x W + b.  x: [N, in], W: [in, out], b: [out], y: [N, out].
public struct Linear<T: Scalar, Kind> {
    public let weight: Parameter<T, Kind>
    public let bias: Parameter<T, Kind>?

    public var inputSize: Int { weight.rows }
    public var outputSize: Int { weight.columns }

    public init(weight: Parameter<T, Kind>, bias: Parameter<T, Kind>?) {
        precondition(bias == nil || bias!.count == weight.columns, "bias must have one value per output")
        self.weight = weight
        self.bias = bias
    }

    /// Registers `name.weight` [in, out] (decayed, normal(deviation)) and `name.bias` (zeros).
    public init(store: ParameterStore<T, Kind>, name: String, inputSize: Int, outputSize: Int,
                deviation: Double, bias: Bool = true) {
        self.weight = store.add("\(name).weight", rows: inputSize, columns: outputSize, weightDecay: true,
                                initialization: .normal(standardDeviation: deviation))
        self.bias = bias ? store.add("\(name).bias", rows: 1, columns: outputSize, weightDecay: false,
                                     initialization: .zeros) : nil
    }

    /// y = x W + b (overwrites y).
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>) {
        gemm(m: rows, n: outputSize, k: inputSize, a: x, b: weight.value, c: y)
        if let bias { Kernels.addBias(bias.value, to: y, rows: rows, columns: outputSize) }
    }

    /// Adjoint of `forward`: dW += xᵀ dy, db += Σ_rows dy, dx += dy Wᵀ (if dx is given).
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>?) {
        gemm(transposeA: true, m: inputSize, n: outputSize, k: rows, a: x, b: dy, beta: 1, c: weight.gradient)
        if let bias { Kernels.addColumnSums(dy, rows: rows, columns: outputSize, into: bias.gradient) }
        if let dx { gemm(transposeB: true, m: rows, n: inputSize, k: outputSize, a: dy, b: weight.value, beta: 1, c: dx) }
    }
}
