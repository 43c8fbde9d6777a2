/// Always-on experts (DeepSeek's shared experts, Qwen2-MoE's shared expert): one replicated FFN
/// applied to every token and added to the routed output, optionally scaled per token by a
/// learned sigmoid(x w_g) (Qwen2-MoE's shared-expert gate). S shared experts of hidden H_s are one
/// FFN of hidden S·H_s: the sum of S FFNs is the FFN of their hidden units side by side.
/// x, y: [N, C]; the gate's weight w_g: [C, 1].
public final class SharedExperts<T: Scalar> {
    public let feedForward: FeedForward<T, Replicated>
    public let gate: Linear<T, Replicated>?
    // Forward activations (kept for backward) and backward scratch.
    let hidden = FeedForwardStorage<T>(), output = Tensor<T>(), gateValues = Tensor<T>()
    let dOutput = Tensor<T>(), dHidden = Tensor<T>(), dGate = Tensor<T>()

    public init(feedForward: FeedForward<T, Replicated>, gate: Linear<T, Replicated>?) {
        precondition(gate.map { $0.outputSize == 1 && $0.bias == nil } ?? true, "the shared-expert gate is one logit per token, no bias")
        self.feedForward = feedForward
        self.gate = gate
    }

    /// y += g ⊙ shared(x), g = sigmoid(x w_g) per row (1 without a gate).
    func forward(_ x: UnsafePointer<T>, rows: Int, addingTo y: UnsafeMutablePointer<T>, rounded: Bool) {
        let width = feedForward.width
        hidden.resize(rows: rows, for: feedForward, rounded: rounded)
        output.resize(rows: rows, columns: width)
        feedForward.forward(x, rows: rows, into: output.pointer, hidden: hidden.hidden())
        guard let gate else { return Kernels.add(output.pointer, into: y, count: rows * width) }
        gateValues.resize(rows: rows, columns: 1)
        gate.forward(x, rows: rows, into: gateValues.pointer)
        Kernels.sigmoid(gateValues.pointer, into: gateValues.pointer, count: rows)
        for row in 0..<rows { Kernels.axpy(gateValues.pointer[row], output.row(row), into: y + row * width, count: width) }
    }

    /// Adjoint of `forward`: d shared = g dy, dlogit = <dy, shared(x)> g (1 - g); dx accumulated.
    func backward(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, rows: Int, dx: UnsafeMutablePointer<T>) {
        let width = feedForward.width
        var dShared = dy
        if let gate {
            dOutput.resize(rows: rows, columns: width)
            dGate.resize(rows: rows, columns: 1)
            for row in 0..<rows {
                let g = gateValues.pointer[row], dyRow = dy + row * width
                let dRow = dOutput.row(row)
                for c in 0..<width { dRow[c] = g * dyRow[c] }
                dGate.pointer[row] = Kernels.dot(dyRow, UnsafePointer(output.row(row)), count: width) * g * (1 - g)
            }
            gate.backward(x, dGate.pointer, rows: rows, dx: dx)
            dShared = UnsafePointer(dOutput.pointer)
        }
        dHidden.resize(rows: rows, columns: feedForward.scratchColumns)
        feedForward.backward(x, dShared, rows: rows, dx: dx, hidden: hidden.hidden(), scratch: dHidden.pointer)
    }
}
