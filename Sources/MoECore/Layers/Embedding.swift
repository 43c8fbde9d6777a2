/// Token plus learned position embedding. tokens: [B*T] ids, out: [B*T, C].
public struct Embedding<T: Scalar> {
    public let tokenTable: Parameter<T, Replicated>      // [V, C]
    public let positionTable: Parameter<T, Replicated>   // [maxT, C]

    public var width: Int { tokenTable.columns }
    public var vocabularySize: Int { tokenTable.rows }

    public init(store: ParameterStore<T, Replicated>, vocabularySize: Int, context: Int, width: Int, decay: Bool) {
        tokenTable = store.add(ParameterPath("embedding.token", role: .tokenEmbedding), rows: vocabularySize, columns: width, weightDecay: decay,
                               initialization: .normal(standardDeviation: 0.02))
        positionTable = store.add(ParameterPath("embedding.position", role: .positionEmbedding), rows: context, columns: width, weightDecay: decay,
                                  initialization: .normal(standardDeviation: 0.01))
    }

    /// out[b*T + t] = token[tokens[b*T + t]] + position[t].
    public func forward(tokens: UnsafePointer<Int32>, batch: Int, length: Int, into out: UnsafeMutablePointer<T>) {
        precondition(length <= positionTable.rows, "sequence longer than the model's context")
        let width = self.width, vocabularySize = self.vocabularySize
        let tokenTable = self.tokenTable.value, positionTable = self.positionTable.value
        for b in 0..<batch {
            for t in 0..<length {
                let row = out + (b * length + t) * width
                let token = Int(tokens[b * length + t])
                precondition(token >= 0 && token < vocabularySize, "token id \(token) outside the vocabulary")
                let tokenRow = tokenTable + token * width, positionRow = positionTable + t * width
                for c in 0..<width { row[c] = tokenRow[c] + positionRow[c] }
            }
        }
    }

    /// Adjoint: scatter-adds dOut into the rows of both tables that forward read.
    public func backward(tokens: UnsafePointer<Int32>, batch: Int, length: Int, dOut: UnsafePointer<T>) {
        let width = self.width
        let tokenGradient = tokenTable.gradient, positionGradient = positionTable.gradient
        for b in 0..<batch {
            for t in 0..<length {
                let dRow = dOut + (b * length + t) * width
                Kernels.add(dRow, into: tokenGradient + Int(tokens[b * length + t]) * width, count: width)
                Kernels.add(dRow, into: positionGradient + t * width, count: width)
            }
        }
    }
}
