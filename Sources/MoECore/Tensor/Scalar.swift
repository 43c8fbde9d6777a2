import Foundation
import CBLAS
import CDNNL
import CVectorMath
import MoEComm

/// The floating-point types the numeric code runs in: `Float` for training, `Double` for
/// finite-difference gradient checks. Each provides its BLAS GEMM and a vectorised `exp`. (Codable:
/// both are, and the gates' `@_specialize(where T == Float)` asks the protocol to say so.)
public protocol Scalar: BinaryFloatingPoint, SIMDScalar, CommElement, Sendable, LosslessStringConvertible, Codable
where Self.RawSignificand: FixedWidthInteger {
    /// Row-major C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C.
    static func gemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Self,
                     a: UnsafePointer<Self>, lda: Int, b: UnsafePointer<Self>, ldb: Int,
                     beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)
    /// exp of 16 lanes, relative error below 2 ulp over the clamped range, no libm calls.
    static func exp(_ x: SIMD16<Self>) -> SIMD16<Self>
    /// Largest finite argument for which `exp` is used without clamping.
    static var expArgumentLimit: Self { get }
}

extension Float: Scalar {
    @inline(__always)
    public static func gemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Float,
                            a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                            beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        // One output row (incremental decoding): a matrix-vector product. OpenBLAS's sgemm runs
        // 1 x N x K shapes through a small-matrix kernel several times slower than sgemv.
        if m == 1 && k > 0 {
            // c[n] = alpha Σ_k a[k] op(B)[k, n] + beta c[n]; a's k-th element is a[k * lda] when A is transposed.
            cblas_sgemv(CblasRowMajor, transposeB ? CblasNoTrans : CblasTrans, Int32(transposeB ? n : k), Int32(transposeB ? k : n),
                        alpha, b, Int32(ldb), a, Int32(transposeA ? lda : 1), beta, c, 1)
            return
        }
        // For beta = 0 OpenBLAS's level-3 driver first clears C with scalar stores (its generic beta
        // kernel: about 2% of a training step's cycles on AMD Zen 3), then its kernels add the
        // products into C. A clear with vector stores followed by C += αAB does the same
        // arithmetic, bit for bit. Smaller products keep beta 0: on AVX-512 cores OpenBLAS runs
        // them through kernels that write C directly (its direct and small-matrix paths).
        var beta = beta
        if beta == 0 && m * n * k >= driverProductSize {
            clearMatrix(c, rows: m, columns: n, stride: ldc)
            beta = 1
        }
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// Multiply-adds from which OpenBLAS 0.3.21 runs every product through its level-3 driver
    /// (its direct sgemm path stops at 28 x 512 x 512, the small-matrix kernels well below).
    static let driverProductSize = 28 * 512 * 512

    /// Zeros rows x columns of a row-major matrix whose rows are `stride` apart.
    @inline(__always)
    static func clearMatrix(_ c: UnsafeMutablePointer<Float>, rows: Int, columns: Int, stride: Int) {
        if stride == columns {
            memset(c, 0, rows * columns * MemoryLayout<Float>.stride)
            return
        }
        for row in 0..<rows { memset(c + row * stride, 0, columns * MemoryLayout<Float>.stride) }
    }

    public static var expArgumentLimit: Float { 88 }

    /// exp of 16 lanes (CVectorMath's swiftmoe_exp16: range reduction by ln 2 and a degree-6
    /// polynomial in fused multiply-adds; arguments clamped to [-87, 88]).
    @inline(__always)
    public static func exp(_ x: SIMD16<Float>) -> SIMD16<Float> { swiftmoe_exp16(x) }
}

extension Double: Scalar {
    @inline(__always)
    public static func gemm(transposeA: Bool, transposeB: Bool, m: Int, n: Int, k: Int, alpha: Double,
                            a: UnsafePointer<Double>, lda: Int, b: UnsafePointer<Double>, ldb: Int,
                            beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int) {
        cblas_dgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    public static var expArgumentLimit: Double { 709 }

    /// Same scheme as Float's, with 1.5 * 2^52 as the magic number and a degree-13 polynomial.
    @inline(__always)
    public static func exp(_ x: SIMD16<Double>) -> SIMD16<Double> {
        let clamped = x.clamped(lowerBound: SIMD16(repeating: -708.0), upperBound: SIMD16(repeating: 709.0))
        let magic = SIMD16<Double>(repeating: 6_755_399_441_055_744.0)
        let shifted = clamped * 1.442_695_040_888_963_4 + magic
        let n = shifted - magic
        let r = clamped - n * 6.931_471_803_691_238_164_90e-01 - n * 1.908_214_929_270_587_700_02e-10
        var p = SIMD16<Double>(repeating: 1.0 / 6_227_020_800.0)
        var factorial = 6_227_020_800.0
        for degree in stride(from: 12, through: 1, by: -1) {
            factorial /= Double(degree + 1)
            p = p * r + 1.0 / factorial
        }
        p = p * r + 1.0
        let integerN = unsafeBitCast(shifted, to: SIMD16<Int64>.self) &- unsafeBitCast(magic, to: SIMD16<Int64>.self)
        let scale = unsafeBitCast((integerN &+ 1023) &<< 52, to: SIMD16<Double>.self)
        return p * scale
    }
}

/// Row-major GEMM on raw pointers: C[m,n] = alpha * op(A) op(B) + beta * C. Leading dimensions
/// default to the packed ones, so strided views (one head's columns of QKV) need no copies.
@inline(__always)
public func gemm<T: Scalar>(transposeA: Bool = false, transposeB: Bool = false, m: Int, n: Int, k: Int,
                            alpha: T = 1, a: UnsafePointer<T>, lda: Int? = nil,
                            b: UnsafePointer<T>, ldb: Int? = nil,
                            beta: T = 0, c: UnsafeMutablePointer<T>, ldc: Int? = nil) {
    guard m > 0, n > 0 else { return }
    if k == 0 {
        // BLAS may not scale C when k == 0; keep the contract explicit.
        let rowStride = ldc ?? n
        for row in 0..<m { for column in 0..<n { c[row * rowStride + column] *= beta } }
        return
    }
    T.gemm(transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k, alpha: alpha,
           a: a, lda: lda ?? (transposeA ? m : k), b: b, ldb: ldb ?? (transposeB ? k : n),
           beta: beta, c: c, ldc: ldc ?? n)
}

/// OpenBLAS facts to log with every run and benchmark (see the OPENBLAS_CORETYPE trap).
public enum BLASInfo {
    public static var coreName: String { String(cString: openblas_get_corename()) }
    public static var threads: Int { Int(openblas_get_num_threads()) }
    /// Threads of both matrix libraries: OpenBLAS and oneDNN.
    public static func setThreads(_ count: Int) {
        setBLASThreads(count)
        setOneDNNThreads(count)
    }
    public static func setBLASThreads(_ count: Int) { openblas_set_num_threads(Int32(count)) }
    /// oneDNN threads through OpenMP (Debian builds it on libgomp), for the calling thread.
    public static func setOneDNNThreads(_ count: Int) { omp_set_num_threads(Int32(count)) }
    public static var oneDNNThreads: Int { Int(omp_get_max_threads()) }

    /// Threads for a process that has the machine's cores to itself (one rank, no mpirun):
    /// oneDNN's threads take the cores, pinned one per core, and OpenBLAS (the router's small
    /// products, decoding, the Double checks) runs on one thread. Left to their defaults, both
    /// libraries start a thread per core and their idle threads spin against each other's: on
    /// configs/bench.yaml (AMD EPYC, 2 cores, bf16) 6,223 tokens/s, against 10,537 with OpenBLAS on
    /// one thread and 11,369 with oneDNN's threads also pinned (7,288 on one core). A user's
    /// OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or OpenMP binding variable is kept.
    public static func shareCoresInOneProcess(environment: [String: String] = ProcessInfo.processInfo.environment) {
        ownsMachine = true
        if environment["OPENBLAS_NUM_THREADS"] == nil { setBLASThreads(1) }
        let bindingChosen = ["OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY"].contains { environment[$0] != nil }
        if !bindingChosen { pinnedOneDNNThreads = Int(swiftmoe_pin_openmp_threads()) }
    }

    /// The threads a step's products run on: a one-process run's oneDNN threads (its cores; and
    /// OpenBLAS's, set by `productsRun` when the products run there), else one (a rank per core).
    public static var stepThreads: Int { ownsMachine ? oneDNNThreads : 1 }

    /// Runs `body(stepThreads)` with both libraries on the threads a step would give its products
    /// (one each under mpirun; in one process, OpenBLAS as `productsRun` sets it for them), then
    /// restores their thread counts.
    public static func onStepThreads<R>(_ body: (Int) throws -> R) rethrows -> R {
        let (blas, oneDNN) = (threads, oneDNNThreads)
        if ownsMachine { productsRun(onOpenBLAS: true) } else { setThreads(1) }
        defer { setBLASThreads(blas); setOneDNNThreads(oneDNN) }
        return try body(stepThreads)
    }

    /// Wakes oneDNN's OpenMP threads with an empty region: afterwards they poll for the next one
    /// on their cores, as they do between a step's products (see `KernelMeasurement.measure`).
    public static func wakeOneDNNThreads() {
        if oneDNNThreads > 1 { swiftmoe_wake_openmp_threads(Int32(oneDNNThreads)) }
    }

    /// Runs `body` on contiguous parts of [0, count) (boundaries on multiples of `grain`), one per
    /// pinned oneDNN thread, in a one-process run where the pass is long enough to pay for waking
    /// them (64K elements, `elementsPerUnit` per unit of count: a row's width when count is rows);
    /// else `body(0, count)` on the calling thread. For element-wise passes only: each element is
    /// computed as it would be in one pass, so the results are bitwise the same (no sum may cross
    /// a part boundary).
    public static func splitElementwise(_ count: Int, grain: Int = 16, elementsPerUnit: Int = 1, _ body: (Int, Int) -> Void) {
        let threads = pinnedOneDNNThreads
        guard threads > 1, count * elementsPerUnit >= 1 << 16, count >= grain * threads else { return body(0, count) }
        typealias Body = (Int, Int) -> Void
        withoutActuallyEscaping(body) { escaping in
            var box: Body = escaping
            withUnsafeMutablePointer(to: &box) { pointer in
                swiftmoe_parallel_parts(count, grain, Int32(threads), { context, begin, end in
                    context!.assumingMemoryBound(to: Body.self).pointee(begin, end)
                }, pointer)
            }
        }
    }

    /// How many of oneDNN's threads `shareCoresInOneProcess` pinned (0: none).
    public private(set) nonisolated(unsafe) static var pinnedOneDNNThreads = 0
    nonisolated(unsafe) static var ownsMachine = false

    /// Gives OpenBLAS oneDNN's threads when a one-process run's fp32 products were chosen to run
    /// on OpenBLAS (so that they do not run on one core of many); a no-op otherwise.
    public static func productsRun(onOpenBLAS: Bool, environment: [String: String] = ProcessInfo.processInfo.environment) {
        guard onOpenBLAS, ownsMachine, environment["OPENBLAS_NUM_THREADS"] == nil else { return }
        setBLASThreads(oneDNNThreads)
    }
}
