/// Hash layers (`hash`, docs/ALGORITHMS.md 5): expert = h(input token id), weight 1; no router,
/// no auxiliary loss, no capacity. The table [1, V] (expert ids stored as floats) is a frozen
/// replicated tensor, so checkpoints carry it.
public final class TableLookupPolicy<T: Scalar>: SelectionPolicy {
    public let table: Parameter<T, Replicated>
    public let expertCount: Int
    /// Training-token counts per id for the balanced table; nil: a uniform random table.
    let frequencies: [Int]?

    public init(table: Parameter<T, Replicated>, expertCount: Int, balancedBy frequencies: [Int]?) {
        self.table = table
        self.expertCount = expertCount
        self.frequencies = frequencies
    }

    /// random: h(v) uniform, drawn from (seed, layer). balanced: ids by decreasing frequency (ties
    /// by id) go to the expert with the least accumulated count (ties: lowest index); unseen ids
    /// round-robin.
    public func initializeState(seed: Int, layer: Int) {
        let vocabulary = table.columns, values = table.value
        guard let frequencies else {
            let key = RandomKey(UInt64(seed)).derive("hash").derive(layer)
            for v in 0..<vocabulary { values[v] = T(key.integer(v, below: expertCount)) }
            return
        }
        var mass = [Int](repeating: 0, count: expertCount)
        let seen = (0..<vocabulary).filter { $0 < frequencies.count && frequencies[$0] > 0 }
            .sorted { (frequencies[$0], -$0) > (frequencies[$1], -$1) }
        for v in seen {
            let expert = mass.indices.min { (mass[$0], $0) < (mass[$1], $1) }!
            values[v] = T(expert)
            mass[expert] += frequencies[v]
        }
        var next = 0
        for v in 0..<vocabulary where !(v < frequencies.count && frequencies[v] > 0) {
            values[v] = T(next)
            next = (next + 1) % expertCount
        }
    }

    @_specialize(where T == Float)
    public func select(_ scores: RouterScores<T>, rows: Int, context: RoutingContext, into routing: Routing<T>) throws {
        guard let ids = context.tokenIds else { preconditionFailure("hash routing needs the token ids") }
        for s in 0..<rows { routing.append(token: s, expert: Int(table.value[Int(ids[s])].rounded()), weight: 1) }
    }

    /// The weights are constants: nothing to propagate.
    @_specialize(where T == Float)
    public func backward(_ dWeights: UnsafePointer<T>, routing: Routing<T>, scores: RouterScores<T>, into dLogits: Tensor<T>) {}
}
