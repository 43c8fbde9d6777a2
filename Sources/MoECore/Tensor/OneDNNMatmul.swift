import CDNNL

/// What the CPU offers for bfloat16 products, as oneDNN reports it (`DNNL_MAX_CPU_ISA` caps it).
public struct BFloat16Support: Sendable {
    /// oneDNN's effective instruction set, e.g. "avx512_core_bf16".
    public let isa: String
    public let supported: Bool

    public static var current: BFloat16Support {
        let isa = dnnl_get_effective_cpu_isa().rawValue
        let bf16 = dnnl_cpu_isa_avx512_core_bf16.rawValue
        let names: [(UInt32, String)] = [
            (dnnl_cpu_isa_avx512_core_amx.rawValue, "avx512_core_amx"), (bf16, "avx512_core_bf16"),
            (dnnl_cpu_isa_avx512_core_vnni.rawValue, "avx512_core_vnni"), (dnnl_cpu_isa_avx512_core.rawValue, "avx512_core"),
            (dnnl_cpu_isa_avx2_vnni.rawValue, "avx2_vnni"), (dnnl_cpu_isa_avx2.rawValue, "avx2"),
            (dnnl_cpu_isa_avx.rawValue, "avx"), (dnnl_cpu_isa_sse41.rawValue, "sse41"),
        ]
        let name = names.first { $0.0 & isa == $0.0 }?.1 ?? "0x\(String(isa, radix: 16))"
        return BFloat16Support(isa: name, supported: isa & bf16 == bf16)
    }
}

/// An input element type of oneDNN's matmul: fp32 or bf16 (both accumulate and write fp32).
public protocol MatmulInput {
    static var dataType: dnnl_data_type_t { get }
}
extension Float: MatmulInput { public static var dataType: dnnl_data_type_t { dnnl_f32 } }
extension BFloat16: MatmulInput { public static var dataType: dnnl_data_type_t { dnnl_bf16 } }

/// Matrix products through oneDNN's matmul primitive: fp32 or bf16 inputs, fp32 accumulation
/// and fp32 output, `C = alpha op(A) op(B) + beta C` with beta 0 or 1. `precision` is what the
/// model's products use when they run on this engine (bf16: inputs rounded first); the engine
/// itself runs either input type (the kernel measurements use both).
///
/// Primitives are slow to create, so each is made once and cached. The token dimension of a
/// 2-D product (M, or K for weight gradients) varies from call to call (experts receive a
/// different number of rows every step), so 2-D primitives declare M and K as runtime
/// dimensions: one primitive serves every token count at full speed (measured: oneDNN 2.6
/// picks its jit GEMM at the same speed as the fixed-shape kernel). Batched (attention)
/// products have fixed shapes. Memory descriptors are cached per concrete shape, so a step
/// allocates nothing once every shape has been seen.
public final class OneDNNMatmul {
    /// One product's shape: dims = (batch0, batch1, m, n, k), strides in elements as
    /// (batch0, batch1, row, column) of A [m, k], B [k, n] and C [m, n].
    struct Shape: Hashable {
        var dims: SIMD8<Int>
        var aStrides: SIMD4<Int>, bStrides: SIMD4<Int>, cStrides: SIMD4<Int>
        var alphaBits: UInt32
        var accumulate: Bool
        var inputType: UInt32
        /// C = op(A) op(B) + bias (fp32 [n], added to every row by the kernel; 2-D products only).
        var addsBias = false
        var batched: Bool { dims[0] != 1 || dims[1] != 1 }
    }

    struct Memories {
        let a: dnnl_memory_t, b: dnnl_memory_t, c: dnnl_memory_t, bias: dnnl_memory_t?
    }

    private let engine: dnnl_engine_t
    private let stream: dnnl_stream_t
    private var primitives: [Shape: dnnl_primitive_t] = [:]
    private var memories: [Shape: Memories] = [:]
    private let runtime = swiftmoe_dnnl_runtime_dim()
    /// The execution arguments (A, B, C, bias), reused by every call (an array literal would allocate).
    private let arguments = UnsafeMutablePointer<dnnl_exec_arg_t>.allocate(capacity: 4)
    /// The input format of the model's products on this engine.
    public let precision: Precision
    /// Conversion scratch for callers (inputs rounded to bf16 just before a product).
    public let left = BFloat16Buffer(), right = BFloat16Buffer()
    /// The scratch pair where the model's products round their inputs: nil in fp32.
    public var rounding: (left: BFloat16Buffer, right: BFloat16Buffer)? { precision == .bf16 ? (left, right) : nil }

    public init(precision: Precision) throws {
        self.precision = precision
        var engine: dnnl_engine_t?
        var stream: dnnl_stream_t?
        try Self.check(dnnl_engine_create(&engine, dnnl_cpu, 0), "creating the oneDNN CPU engine")
        try Self.check(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags.rawValue), "creating a oneDNN stream")
        self.engine = engine!
        self.stream = stream!
    }

    deinit {
        for memory in memories.values {
            for handle in [memory.a, memory.b, memory.c, memory.bias].compactMap({ $0 }) { dnnl_memory_destroy(handle) }
        }
        for primitive in primitives.values { dnnl_primitive_destroy(primitive) }
        arguments.deallocate()
        dnnl_stream_destroy(stream)
        dnnl_engine_destroy(engine)
    }

    /// Row-major `C[m,n] = alpha op(A)[m,k] op(B)[k,n] + beta C`, beta 0 or 1; the same contract
    /// as `gemm` for Float, with fp32 or bf16 A and B.
    /// With `bias` (fp32 [n], beta 0 only) the kernel adds it to every row of C as it stores C.
    public func gemm<Input: MatmulInput>(transposeA: Bool = false, transposeB: Bool = false, m: Int, n: Int, k: Int, alpha: Float = 1,
                     a: UnsafePointer<Input>, lda: Int? = nil, b: UnsafePointer<Input>, ldb: Int? = nil,
                     beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int? = nil, bias: UnsafePointer<Float>? = nil) {
        let lda = lda ?? (transposeA ? m : k), ldb = ldb ?? (transposeB ? k : n), ldc = ldc ?? n
        batchedGemm(batch: (1, 1), m: m, n: n, k: k, alpha: alpha,
                    a: a, aStrides: SIMD4(0, 0, transposeA ? 1 : lda, transposeA ? lda : 1),
                    b: b, bStrides: SIMD4(0, 0, transposeB ? 1 : ldb, transposeB ? ldb : 1),
                    beta: beta, c: c, cStrides: SIMD4(0, 0, ldc, 1), bias: bias)
    }

    /// `batch.0 x batch.1` independent products in one call, each operand addressed by strides
    /// (batch0, batch1, row, column) in elements: attention's per-(sequence, head) products on
    /// strided views of the QKV rows, without copies.
    public func batchedGemm<Input: MatmulInput>(batch: (Int, Int), m: Int, n: Int, k: Int, alpha: Float = 1,
                            a: UnsafePointer<Input>, aStrides: SIMD4<Int>,
                            b: UnsafePointer<Input>, bStrides: SIMD4<Int>,
                            beta: Float = 0, c: UnsafeMutablePointer<Float>, cStrides: SIMD4<Int>, bias: UnsafePointer<Float>? = nil) {
        precondition(beta == 0 || beta == 1, "bf16 products accumulate with beta 0 or 1 only")
        precondition(bias == nil || (batch == (1, 1) && beta == 0), "a bias is added to a fresh 2-D product only")
        guard m > 0, n > 0, batch.0 > 0, batch.1 > 0 else { return }
        if k == 0 {
            if beta == 0 {
                for b0 in 0..<batch.0 { for b1 in 0..<batch.1 { for row in 0..<m { for column in 0..<n {
                    c[b0 * cStrides[0] + b1 * cStrides[1] + row * cStrides[2] + column * cStrides[3]] = 0
                } } } }
            }
            return
        }
        let shape = Shape(dims: SIMD8(batch.0, batch.1, m, n, k, 0, 0, 0), aStrides: aStrides, bStrides: bStrides,
                          cStrides: cStrides, alphaBits: alpha.bitPattern, accumulate: beta == 1,
                          inputType: Input.dataType.rawValue, addsBias: bias != nil)
        let memory = memories[shape] ?? makeMemories(shape)
        dnnl_memory_set_data_handle(memory.a, UnsafeMutableRawPointer(mutating: a))
        dnnl_memory_set_data_handle(memory.b, UnsafeMutableRawPointer(mutating: b))
        dnnl_memory_set_data_handle(memory.c, UnsafeMutableRawPointer(c))
        arguments[0] = dnnl_exec_arg_t(arg: DNNL_ARG_SRC, memory: memory.a)
        arguments[1] = dnnl_exec_arg_t(arg: DNNL_ARG_WEIGHTS, memory: memory.b)
        arguments[2] = dnnl_exec_arg_t(arg: DNNL_ARG_DST, memory: memory.c)
        if let bias, let handle = memory.bias {
            dnnl_memory_set_data_handle(handle, UnsafeMutableRawPointer(mutating: bias))
            arguments[3] = dnnl_exec_arg_t(arg: DNNL_ARG_BIAS, memory: handle)
        }
        let status = dnnl_primitive_execute(primitive(for: shape), stream, bias == nil ? 3 : 4, arguments)
        precondition(status == dnnl_success, "oneDNN matmul failed (status \(status.rawValue)) for \(shape)")
    }

    /// The primitive of `shape`'s class: 2-D products with runtime M and K.
    private func primitive(for shape: Shape) -> dnnl_primitive_t {
        var key = shape
        if !shape.batched { key.dims[2] = -1; key.dims[4] = -1 }
        if let primitive = primitives[key] { return primitive }
        var a = descriptor(key, .a), b = descriptor(key, .b), c = descriptor(key, .c), bias = descriptor(key, .bias)
        var operation = dnnl_matmul_desc_t()
        var attributes: dnnl_primitive_attr_t?
        var postOps: dnnl_post_ops_t?
        var primitiveDescriptor: dnnl_primitive_desc_t?
        var primitive: dnnl_primitive_t?
        var alpha = Float(bitPattern: shape.alphaBits)
        var status = shape.addsBias ? dnnl_matmul_desc_init(&operation, &a, &b, &bias, &c) : dnnl_matmul_desc_init(&operation, &a, &b, nil, &c)
        if status == dnnl_success { status = dnnl_primitive_attr_create(&attributes) }
        if status == dnnl_success, alpha != 1 { status = dnnl_primitive_attr_set_output_scales(attributes, 1, 0, &alpha) }
        if status == dnnl_success, shape.accumulate {
            status = dnnl_post_ops_create(&postOps)
            if status == dnnl_success { status = dnnl_post_ops_append_sum(postOps, 1) }
            if status == dnnl_success { status = dnnl_primitive_attr_set_post_ops(attributes, postOps) }
        }
        if status == dnnl_success { status = dnnl_primitive_desc_create(&primitiveDescriptor, &operation, attributes, engine, nil) }
        if status == dnnl_success { status = dnnl_primitive_create(&primitive, primitiveDescriptor) }
        if let postOps { dnnl_post_ops_destroy(postOps) }
        if let attributes { dnnl_primitive_attr_destroy(attributes) }
        if let primitiveDescriptor { dnnl_primitive_desc_destroy(primitiveDescriptor) }
        precondition(status == dnnl_success, "oneDNN could not create a matmul (status \(status.rawValue)) for \(shape)")
        primitives[key] = primitive!
        return primitive!
    }

    private enum Operand { case a, b, c, bias }

    /// The memory descriptor of one operand; -1 dims become oneDNN runtime dims.
    private func descriptor(_ shape: Shape, _ operand: Operand) -> dnnl_memory_desc_t {
        let (batch0, batch1, m, n, k) = (shape.dims[0], shape.dims[1], shape.dims[2], shape.dims[3], shape.dims[4])
        let (rows, columns, strides, type): (Int, Int, SIMD4<Int>, dnnl_data_type_t) = switch operand {
        case .a: (m, k, shape.aStrides, dnnl_data_type_t(shape.inputType))
        case .b: (k, n, shape.bStrides, dnnl_data_type_t(shape.inputType))
        case .c: (m, n, shape.cStrides, dnnl_f32)
        case .bias: (1, n, SIMD4(0, 0, n, 1), dnnl_f32)
        }
        let dimension = { (value: Int) -> dnnl_dim_t in value < 0 ? self.runtime : dnnl_dim_t(value) }
        let dims = (shape.batched ? [batch0, batch1, rows, columns] : [rows, columns]).map(dimension)
        let steps = (shape.batched ? [strides[0], strides[1], strides[2], strides[3]] : [strides[2], strides[3]]).map { dnnl_dim_t($0) }
        var descriptor = dnnl_memory_desc_t()
        let status = dnnl_memory_desc_init_by_strides(&descriptor, Int32(dims.count), dims, type, steps)
        precondition(status == dnnl_success, "oneDNN rejected a memory layout (status \(status.rawValue)) for \(shape)")
        return descriptor
    }

    private func makeMemories(_ shape: Shape) -> Memories {
        func create(_ operand: Operand) -> dnnl_memory_t {
            var descriptor = self.descriptor(shape, operand)
            var memory: dnnl_memory_t?
            let status = dnnl_memory_create(&memory, &descriptor, engine, nil)
            precondition(status == dnnl_success, "oneDNN could not describe an operand (status \(status.rawValue))")
            return memory!
        }
        let made = Memories(a: create(.a), b: create(.b), c: create(.c), bias: shape.addsBias ? create(.bias) : nil)
        memories[shape] = made
        return made
    }

    static func check(_ status: dnnl_status_t, _ operation: String) throws {
        guard status == dnnl_success else { throw PrecisionError.oneDNN(operation: operation, status: Int(status.rawValue)) }
    }
}

public enum PrecisionError: Error, CustomStringConvertible {
    case oneDNN(operation: String, status: Int)
    case unsupported(isa: String)

    public var description: String {
        switch self {
        case let .oneDNN(operation, status): return "oneDNN failed \(operation) (status \(status))"
        case let .unsupported(isa):
            return "train.precision: bf16 needs the CPU feature AVX512-BF16 (or AMX), which oneDNN does not report here (its instruction set is \(isa)); use precision fp32 or auto"
        }
    }
}
