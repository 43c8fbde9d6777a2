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

    /// Registers `path.weight` [in, out] (decayed, normal(deviation)) and `path.bias` (zeros).
    public init(store: ParameterStore<T, Kind>, path: ParameterPath, inputSize: Int, outputSize: Int,
                deviation: Double, bias: Bool = true) {
        self.weight = store.add(path.appending("weight"), rows: inputSize, columns: outputSize, weightDecay: true,
                                initialization: .normal(standardDeviation: deviation), productOnly: true)
        self.bias = bias ? store.add(path.appending("bias"), rows: 1, columns: outputSize, weightDecay: false,
                                     initialization: .zeros) : nil
    }

    /// y = x W + b (overwrites y).
    public func forward(_ x: UnsafePointer<T>, rows: Int, into y: UnsafeMutablePointer<T>) {
        forward(.values(x), rows: rows, into: y, addingBias: true)
    }

    /// y = x W (+ b), with x as a product operand (a bf16 copy a fused pass made is used as is);
    /// without the bias when the caller's next pass adds it.
    public func forward(_ x: ProductOperand<T>, rows: Int, into y: UnsafeMutablePointer<T>, addingBias: Bool) {
        matrixProduct(weight.store.matmul, m: rows, n: outputSize, k: inputSize, a: x, b: weight.operand, c: y,
                      bias: addingBias ? bias.map { UnsafePointer($0.value) } : nil)
    }

    /// Adjoint of `forward`: dW += xᵀ dy, db += Σ_rows dy, dx += dy Wᵀ (if dx is given).
    /// In bf16 mode x is rounded again here rather than kept from forward (a pass over memory
    /// instead of its memory for the whole step), and dy is rounded once for both products.
    public func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>?) {
        backward(.values(x), .values(dy), rows: rows, dx: dx, dxBeta: 1)
    }

    /// The adjoint with x and dy as product operands (bf16 copies made by a fused pass are used
    /// as they are; plain dy values are rounded once for both products): dW += xᵀ dy,
    /// db += Σ_rows dy unless the caller's pass summed it (`biasGradient` false), and
    /// dx = dy Wᵀ + dxBeta dx (dxBeta 0 or 1).
    public func backward(_ x: ProductOperand<T>, _ dy: ProductOperand<T>, rows: Int, dx: UnsafeMutablePointer<T>?, dxBeta: T,
                         biasGradient: Bool = true) {
        guard case let .values(values) = dy else {
            backwardWeights(x, dy, rows: rows, biasGradient: biasGradient)
            if let dx { backwardInput(dy, rows: rows, dx: dx, dxBeta: dxBeta) }
            return
        }
        let dyOperand = outputGradientOperand(values, rows: rows, roundingInto: weight.store.matmul?.rounding?.right.reserved(rows * outputSize),
                                              summingBias: biasGradient)
        backwardWeights(x, dyOperand, rows: rows, biasGradient: false)
        if let dx { backwardInput(dyOperand, rows: rows, dx: dx, dxBeta: dxBeta) }
    }

    /// dy [rows, out] as the operand of both of the adjoint's products: in bf16 mode (`copy`
    /// given) rounded once into `copy`; with `summingBias`, db += Σ_rows dy as well, in Float and
    /// bf16 mode in the same pass as the rounding.
    func outputGradientOperand(_ dy: UnsafePointer<T>, rows: Int, roundingInto copy: UnsafeMutablePointer<BFloat16>?,
                               summingBias: Bool) -> ProductOperand<T> {
        if summingBias, let bias {
            if T.self == Float.self, let copy {
                FloatKernels.biasGradientRounding(asFloat(dy), rows: rows, columns: outputSize, biasGradient: asFloat(bias.gradient), rounded: copy)
                return .prerounded(dy, UnsafePointer(copy))
            }
            Kernels.addColumnSums(dy, rows: rows, columns: outputSize, into: bias.gradient)
        }
        guard let copy else { return .values(dy) }
        BFloat16.round(asFloat(dy), into: copy, count: rows * outputSize)
        return .prerounded(dy, UnsafePointer(copy))
    }

    /// The weights' half of the adjoint: dW += xᵀ dy (dW = xᵀ dy without `accumulate`: the
    /// product overwrites a gradient that holds nothing of this step), and db += Σ_rows dy unless
    /// the caller's pass summed it (`biasGradient` false).
    public func backwardWeights(_ x: ProductOperand<T>, _ dy: ProductOperand<T>, rows: Int, biasGradient: Bool = true,
                                accumulate: Bool = true) {
        if biasGradient, let bias { Kernels.addColumnSums(dy.values, rows: rows, columns: outputSize, into: bias.gradient) }
        matrixProduct(weight.store.matmul, transposeA: true, m: inputSize, n: outputSize, k: rows, a: x,
                      b: dy, beta: accumulate ? 1 : 0, c: weight.gradient)
    }

    /// The input's half of the adjoint: dx = dy Wᵀ + dxBeta dx (dxBeta 0 or 1).
    public func backwardInput(_ dy: ProductOperand<T>, rows: Int, dx: UnsafeMutablePointer<T>, dxBeta: T) {
        matrixProduct(weight.store.matmul, transposeB: true, m: rows, n: inputSize, k: outputSize, a: dy,
                      b: weight.operand, beta: dxBeta, c: dx)
    }
}

/// An operand of `matrixProduct`: fp32 values that bf16 mode rounds on the fly, or values
/// whose bf16 copy already exists (weights: the optimizer writes it with the values).
public enum ProductOperand<T: Scalar> {
    case values(UnsafePointer<T>)
    case prerounded(UnsafePointer<T>, UnsafePointer<BFloat16>?)

    var values: UnsafePointer<T> {
        switch self { case let .values(pointer), let .prerounded(pointer, _): return pointer }
    }

    /// `values` rounded now into `scratch` (in bf16 mode, where the engine gives one: see
    /// `OneDNNMatmul.rounding`), so that several products can share one rounding.
    static func roundedOnce(_ values: UnsafePointer<T>, count: Int, into scratch: BFloat16Buffer?) -> ProductOperand<T> {
        .prerounded(values, scratch.map { UnsafePointer($0.round(asFloat(values), count: count)) })
    }
}

/// Whether `matrixProduct` with `m` output rows reads its operands' fp32 values, bf16 copies or
/// not: on OpenBLAS (no oneDNN engine, or one row), and in fp32 mode. Elsewhere only the bf16
/// copies are read, and a pass that makes one may skip the fp32 values.
public func readsFloatValues(_ matmul: OneDNNMatmul?, m: Int) -> Bool {
    guard let matmul, m > 1 else { return true }
    return matmul.precision != .bf16
}

/// Row-major `C[m,n] = op(A) op(B) + beta C` on packed operands, on the store's kernel:
/// `cblas_sgemm`/`dgemm` without a oneDNN engine; else oneDNN, on the fp32 values or, in bf16
/// mode, on bf16 inputs with fp32 accumulation (operands without a bf16 copy are rounded into
/// the engine's scratch: A into `left`, B into `right`, so a caller must not pass those buffers
/// as the other operand).
public func matrixProduct<T: Scalar>(_ matmul: OneDNNMatmul?, transposeA: Bool = false, transposeB: Bool = false,
                                     m: Int, n: Int, k: Int, a: ProductOperand<T>, b: ProductOperand<T>,
                                     beta: T = 0, c: UnsafeMutablePointer<T>, bias: UnsafePointer<T>? = nil) {
    // One row (incremental decoding) is a memory-bound matrix-vector product: fp32 sgemv on the
    // master weights beats rounding the row and a oneDNN call (measured 150-185 tokens/s with
    // oneDNN, several times that with sgemv). `readsFloatValues` says the same.
    guard let matmul, m > 1 else {
        gemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, a: a.values, b: b.values, beta: beta, c: c)
        if let bias { Kernels.addBias(bias, to: c, rows: m, columns: n) }
        return
    }
    // oneDNN adds a bias as it stores C (the same fp32 addition as a pass after the product).
    let floatBias = bias.map { asFloat($0) }
    guard matmul.precision == .bf16 else {
        return matmul.gemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k,
                           a: asFloat(a.values), b: asFloat(b.values), beta: Float(beta), c: asFloat(c), bias: floatBias)
    }
    func rounded(_ operand: ProductOperand<T>, count: Int, into scratch: BFloat16Buffer) -> UnsafePointer<BFloat16> {
        if case let .prerounded(_, copy?) = operand { return copy }
        return UnsafePointer(scratch.round(asFloat(operand.values), count: count))
    }
    matmul.gemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k,
                a: rounded(a, count: m * k, into: matmul.left), b: rounded(b, count: k * n, into: matmul.right),
                beta: Float(beta), c: asFloat(c), bias: floatBias)
}

extension Parameter {
    /// The value as a product operand (with its bf16 copy in bf16 mode).
    public var operand: ProductOperand<T> { .prerounded(value, bfloat16Value.map { UnsafePointer($0) }) }
}
