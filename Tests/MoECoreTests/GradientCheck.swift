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
        let stride = max(1, count / samplesPerTensor)
        var worst = 0.0
        for index in Swift.stride(from: 0, to: count, by: stride) {
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
            worst = max(worst, error / allowed)
            if error > allowed {
                XCTFail("\(name)[\(index)]: analytic \(analytic) vs numeric \(numeric) (error \(error), allowed \(allowed))",
                        file: file, line: line)
                return
            }
        }
        XCTAssertLessThanOrEqual(worst, 1, file: file, line: line)
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
