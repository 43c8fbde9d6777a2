/// An error another rank saw, delivered to every rank by `agree`.
public struct RemoteFailure: Error, CustomStringConvertible, AgreedFailure {
    public let rank: Int
    public let message: String
    public var description: String { "rank \(rank) failed: \(message)" }
}

/// Errors every rank of the job raises together (after `agree`): the job can end with a clean
/// MPI_Finalize instead of MPI_Abort.
public protocol AgreedFailure: Error {}

/// A local error wrapped after agreement, so the failing rank too knows everyone agreed.
public struct AgreedLocalFailure: Error, CustomStringConvertible, AgreedFailure {
    public let underlying: Error
    public var description: String { "\(underlying)" }
}

extension Communicator {
    /// Runs `body` on every rank and agrees on the outcome (collective). If any rank failed,
    /// every rank throws: the failing rank its own error, the others a `RemoteFailure` carrying
    /// the lowest failing rank's message. Use it where only some ranks may fail (a file missing
    /// on one node), before any other collective, so no rank is left waiting in one.
    public func agree<Result>(_ body: () throws -> Result) throws -> Result {
        var result: Result?
        var failure: Error?
        do { result = try body() } catch { failure = error }
        let failedRank = try allReduce(failure == nil ? Int64.max : Int64(rank), op: .min)
        if failedRank == Int64.max, let result { return result }
        var message = [UInt8](repeating: 0, count: 2048)
        if Int64(rank) == failedRank, let failure {
            let bytes = Array("\(failure)".utf8.prefix(message.count))
            message.replaceSubrange(0..<bytes.count, with: bytes)
        }
        try message.withUnsafeMutableBytes { try broadcast($0, root: Int(failedRank)) }
        if let failure { throw AgreedLocalFailure(underlying: failure) }
        let text = String(decoding: message.prefix { $0 != 0 }, as: UTF8.self)
        throw RemoteFailure(rank: Int(failedRank), message: text)
    }
}
