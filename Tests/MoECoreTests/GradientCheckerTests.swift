import XCTest
import MoECore
import MoEComm

/// The checker itself: it must fail on what it is there to catch.
final class GradientCheckerTests: XCTestCase {
    func testANaNGradientIsAMismatch() {
        let values = UnsafeMutablePointer<Double>.allocate(capacity: 4)
        defer { values.deallocate() }
        values.initialize(repeating: 1, count: 4)
        let gradients: [Double] = [2, .nan, 2, 2]   // loss = Σ x², so the gradient is 2x = 2
        let loss = { (0..<4).reduce(0.0) { $0 + values[$1] * values[$1] } }
        let failure = GradientChecker().firstMismatch("x", values: values, gradients: gradients, count: 4, loss: loss)
        XCTAssertTrue(failure?.contains("x[1]") == true, failure ?? "a NaN analytic gradient passed")
    }

    /// A gradient wrong in one column only is found, for any tensor width up to the sample count.
    func testProbesCoverEveryColumn() {
        let checker = GradientChecker()
        for columns in 1...checker.samplesPerTensor {
            for rows in [3, 8, 64, 128] {
                let probed = Set(GradientChecker.probes(count: rows * columns, samples: checker.samplesPerTensor).map { $0 % columns })
                XCTAssertEqual(probed.count, columns, "\(rows) x \(columns): columns \(probed.sorted()) probed")
            }
        }
    }
}
