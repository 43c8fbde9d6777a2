#if canImport(Glibc)
import Glibc
#endif
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

extension Communicator {
    /// Whether every rank runs on the same host (collective): their host names agree. Ranks in
    /// separate network namespaces of one machine count as one host.
    public func ranksShareOneHost() throws -> Bool {
        guard size > 1 else { return true }
        var name = [CChar](repeating: 0, count: 256)
        gethostname(&name, name.count - 1)
        // FNV-1a of the name; equal minimum and maximum over ranks mean one name (collisions aside).
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in name.prefix(while: { $0 != 0 }) { hash = (hash ^ UInt64(UInt8(bitPattern: byte))) &* 0x100_0000_01b3 }
        let value = Int64(bitPattern: hash)
        return try allReduce(value, op: .min) == allReduce(value, op: .max)
    }
}
