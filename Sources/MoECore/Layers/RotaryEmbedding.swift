#if canImport(Glibc)
import Glibc
#endif

/// Rotary position embedding (RoFormer), in the rotate-half layout of Hugging Face's Llama: in
/// each head of hd values, dimension i < hd/2 pairs with i + hd/2 and the pair turns by the
/// angle p · θ^(-2i/hd) at position p. Queries and keys are rotated, so q_m · k_n depends only on
/// m - n: a decoder's cached keys stay valid when its window slides.
/// The angles' cosines and sines are computed in Double once per position ([positions, hd/2]).
public final class RotaryEmbedding<T: Scalar> {
    public let headSize: Int
    public let theta: Double
    private let cosines = Tensor<T>(), sines = Tensor<T>()

    public init(headSize: Int, theta: Double, positions: Int) {
        precondition(headSize % 2 == 0, "rotary embeddings turn pairs of dimensions: the head size must be even")
        self.headSize = headSize
        self.theta = theta
        reserve(positions: positions)
    }

    /// Positions the tables hold.
    public var positions: Int { cosines.rows }

    /// Grows the tables to hold `count` positions (a decoder that slides past the context),
    /// doubling, so a long generation recomputes them a logarithmic number of times.
    public func reserve(positions wanted: Int) {
        guard wanted > cosines.rows else { return }
        let half = headSize / 2, count = max(wanted, 2 * cosines.rows)
        cosines.resize(rows: count, columns: half)
        sines.resize(rows: count, columns: half)
        for position in 0..<count {
            for i in 0..<half {
                let angle = Double(position) * Glibc.pow(theta, -2 * Double(i) / Double(headSize))
                cosines.row(position)[i] = T(Glibc.cos(angle))
                sines.row(position)[i] = T(Glibc.sin(angle))
            }
        }
    }

    /// Rotates `heads` consecutive heads of hd values at `position` in place; `inverse` turns
    /// back by the same angle, which is also the adjoint (a rotation's transpose).
    public func rotate(_ x: UnsafeMutablePointer<T>, heads: Int, position: Int, inverse: Bool = false) {
        precondition(position < positions, "rotary tables hold \(positions) positions, asked for \(position)")
        let half = headSize / 2, cosine = cosines.row(position), sine = sines.row(position)
        for head in 0..<heads {
            let first = x + head * headSize, second = first + half
            for i in 0..<half {
                let a = first[i], b = second[i], s = inverse ? -sine[i] : sine[i]
                first[i] = a * cosine[i] - b * s
                second[i] = b * cosine[i] + a * s
            }
        }
    }
}
