/// Token plus learned position embedding (gpt2), or the token embedding alone (llama: positions
/// enter as rotations inside attention). tokens: [B*T] ids, out: [B*T, C].
public struct Embedding<T: Scalar> {
    public let tokenTable: Parameter<T, Replicated>      // [V, C]
    public let positionTable: Parameter<T, Replicated>?  // [maxT, C]

    public var width: Int { tokenTable.columns }
    public var vocabularySize: Int { tokenTable.rows }

    public init(store: ParameterStore<T, Replicated>, vocabularySize: Int, context: Int, width: Int, decay: Bool,
                learnedPositions: Bool = true) {
        tokenTable = store.add(ParameterPath("embedding.token", role: .tokenEmbedding), rows: vocabularySize, columns: width, weightDecay: decay,
                               initialization: .normal(standardDeviation: 0.02))
        positionTable = learnedPositions
            ? store.add(ParameterPath("embedding.position", role: .positionEmbedding), rows: context, columns: width, weightDecay: decay,
                        initialization: .normal(standardDeviation: 0.01))
            : nil
    }

    /// out[b*T + t] = token[tokens[b*T + t]] (+ position[t]).
    public func forward(tokens: UnsafePointer<Int32>, batch: Int, length: Int, into out: UnsafeMutablePointer<T>) {
        precondition(positionTable.map { length <= $0.rows } ?? true, "sequence longer than the model's context")
        for b in 0..<batch {
            for t in 0..<length {
                embed(tokens[b * length + t], position: t, into: out + (b * length + t) * width)
            }
        }
    }

    /// One row: the token's embedding (+ the position's, where positions are learned).
    public func embed(_ token: Int32, position: Int, into row: UnsafeMutablePointer<T>) {
        let token = Int(token), width = self.width
        precondition(token >= 0 && token < vocabularySize, "token id \(token) outside the vocabulary")
        let tokenRow = tokenTable.value + token * width
        guard let positionTable else { return row.update(from: tokenRow, count: width) }
        Kernels.sum(tokenRow, positionTable.value + position * width, into: row, count: width)
    }

    /// Adjoint: scatter-adds dOut into the rows of both tables that forward read.
    public func backward(tokens: UnsafePointer<Int32>, batch: Int, length: Int, dOut: UnsafePointer<T>) {
        let width = self.width
        let tokenGradient = tokenTable.gradient, positionGradient = positionTable?.gradient
        for b in 0..<batch {
            for t in 0..<length {
                let dRow = dOut + (b * length + t) * width
                Kernels.add(dRow, into: tokenGradient + Int(tokens[b * length + t]) * width, count: width)
                if let positionGradient { Kernels.add(dRow, into: positionGradient + t * width, count: width) }
            }
        }
    }
}
