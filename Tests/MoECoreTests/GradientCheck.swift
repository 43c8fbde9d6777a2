import XCTest
import MoECore
import MoEComm

/// Finite-difference gradient checking in Double.
///
/// Central differences with step h = 1e-6 have truncation error O(h²·f''') and rounding error
/// O(ε·|L|/h) ≈ 1e-10 for |L| ~ 1; analytic and numeric values must agree to
/// |a - n| <= 1e-6 + 1e-5·max(|a|, |n|). A wrong backward (a dropped term, a transposed
/// product, a wrong sign) misses this by orders of magnitude.
struct GradientChecker {
    var step = 1e-6
    var absoluteTolerance = 1e-6
    var relativeTolerance = 1e-5
    /// At most this many coordinates per tensor are probed (spread evenly), to keep tests fast.
    var samplesPerTensor = 24

    /// `values`/`gradients`: the tensor being checked; `loss` recomputes the loss from scratch;
    /// the analytic gradient must already be in `gradients`.
    func check(_ name: String, values: UnsafeMutablePointer<Double>, gradients: UnsafePointer<Double>, count: Int,
               loss: () throws -> Double, file: StaticString = #filePath, line: UInt = #line) rethrows {
        if let failure = try firstMismatch(name, values: values, gradients: gradients, count: count, loss: loss) {
            XCTFail(failure, file: file, line: line)
        }
    }

    /// The first probed coordinate whose analytic and numeric derivatives disagree, or nil.
    /// NaN on either side is a mismatch (`!(error <= allowed)`: a NaN compares false to anything).
    func firstMismatch(_ name: String, values: UnsafeMutablePointer<Double>, gradients: UnsafePointer<Double>, count: Int,
                       loss: () throws -> Double) rethrows -> String? {
        for index in Self.probes(count: count, samples: samplesPerTensor) {
            let saved = values[index]
            values[index] = saved + step
            let plus = try loss()
            values[index] = saved - step
            let minus = try loss()
            values[index] = saved
            let numeric = (plus - minus) / (2 * step)
            let analytic = gradients[index]
            let error = abs(numeric - analytic)
            let allowed = absoluteTolerance + relativeTolerance * max(abs(numeric), abs(analytic))
            if !(error <= allowed) {
                return "\(name)[\(index)]: analytic \(analytic) vs numeric \(numeric) (error \(error), allowed \(allowed))"
            }
        }
        return nil
    }

    /// Up to `samples` distinct coordinates i·s mod count, with the stride s ≥ count / samples
    /// coprime to count. Coprime to count means coprime to any row width w that divides it, so
    /// the probes fall in distinct columns and cover all w columns once samples ≥ w (an even
    /// stride over a tensor with w columns could probe a single column, or every other one).
    static func probes(count: Int, samples: Int) -> [Int] {
        guard count > samples else { return Array(0..<count) }
        func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
        var stride = max(1, count / samples)
        while gcd(stride, count) != 1 { stride += 1 }
        return (0..<samples).map { $0 * stride % count }
    }
}

/// Deterministic test data.
func randomTensor(rows: Int, columns: Int, seed: Int, scale: Double = 1) -> Tensor<Double> {
    let key = RandomKey(UInt64(seed))
    return Tensor(rows: rows, columns: columns, values: (0..<rows * columns).map { key.normal($0) * scale })
}

/// Σ y ⊙ R: a loss whose gradient with respect to y is R.
func projectedLoss(_ y: Tensor<Double>, _ projection: Tensor<Double>) -> Double {
    zip(y.array, projection.array).reduce(0) { $0 + $1.0 * $1.1 }
}

extension GradientChecker {
    /// Checks every parameter of `store` (which holds `attention`'s only) and the input of
    /// `attention` over 2 sequences of `length` tokens against finite differences of Σ y ⊙ R.
    func checkAttention(_ attention: CausalSelfAttention<Double>, store: ParameterStore<Double, Replicated>, label: String = "",
                        length: Int = 5) {
        let (batch, width) = (2, attention.projection.inputSize), rows = batch * length
        let x = randomTensor(rows: rows, columns: width, seed: 9), projection = randomTensor(rows: rows, columns: width, seed: 10)
        let y = Tensor<Double>(rows: rows, columns: width), dx = Tensor<Double>(rows: rows, columns: width)
        let cache = CausalSelfAttention<Double>.Cache()
        func loss() -> Double {
            attention.forward(x.pointer, batch: batch, length: length, into: y.pointer, cache: cache)
            return projectedLoss(y, projection)
        }
        _ = loss()
        attention.backward(x.pointer, projection.pointer, batch: batch, length: length, dx: dx.pointer, cache: cache)
        for entry in store.entries {
            check("\(label)\(entry.name)", values: store.values + entry.offset, gradients: store.gradients + entry.offset, count: entry.count, loss: loss)
        }
        check("\(label)x", values: x.pointer, gradients: dx.pointer, count: rows * width, loss: loss)
    }
}
