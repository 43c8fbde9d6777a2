/// Which rank hosts which expert (docs/ALGORITHMS.md 12).
///
/// R <= E: R must divide E; rank r hosts experts r*E_loc ..< (r+1)*E_loc.
/// R > E:  E must divide R; ranks form R/E groups of E consecutive ranks and rank r hosts expert
///         r mod E. A token on rank r is sent to the replica in r's own group.
public struct ExpertPlacement: Equatable, Sendable {
    public let expertCount: Int
    public let rankCount: Int
    public let rank: Int

    public enum PlacementError: Error, CustomStringConvertible {
        case indivisible(experts: Int, ranks: Int)
        public var description: String {
            switch self {
            case let .indivisible(experts, ranks):
                return "moe.experts (\(experts)) and the number of ranks (\(ranks)) do not fit: the ranks must divide "
                    + "the experts, or the experts must divide the ranks; use e.g. \(validRanks(experts).map(String.init).joined(separator: ", ")) ranks"
            }
        }
        private func validRanks(_ experts: Int) -> [Int] {
            (1...experts).filter { experts % $0 == 0 } + [2 * experts]
        }
    }

    public init(expertCount: Int, rankCount: Int, rank: Int) throws {
        guard rankCount <= expertCount ? expertCount % rankCount == 0 : rankCount % expertCount == 0 else {
            throw PlacementError.indivisible(experts: expertCount, ranks: rankCount)
        }
        self.expertCount = expertCount
        self.rankCount = rankCount
        self.rank = rank
    }

    /// Ranks in one expert-parallel group (together they hold every expert once).
    public var groupSize: Int { min(rankCount, expertCount) }
    public var expertsPerRank: Int { expertCount / groupSize }
    /// How many copies of each expert exist (the size of an expert's replica group).
    public var replicas: Int { rankCount / groupSize }
    public var groupBase: Int { (rank / groupSize) * groupSize }
    public var localExperts: Range<Int> {
        let first = (rank - groupBase) * expertsPerRank
        return first..<(first + expertsPerRank)
    }

    /// The rank this rank sends expert e's tokens to.
    @inline(__always) public func owner(of expert: Int) -> Int { groupBase + expert / expertsPerRank }
    @inline(__always) public func localIndex(of expert: Int) -> Int { expert % expertsPerRank }
}
