import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoETestSupport
import MoEIO

/// Distributed logic with ranks as threads (`ThreadedCommunicator`); the same code paths run
/// under MPI in the CLI tests.
final class CommunicatorTests: XCTestCase {
    func testCollectivesAgreeWithTheirDefinitions() throws {
        try ThreadedCommunicator.run(size: 3) { comm in
            let r = Int64(comm.rank)
            var values: [Int64] = [r, 10 * r]
            try comm.allReduce(&values)
            guard values == [3, 30] else { throw TestFailure("all-reduce sum \(values)") }
            var extremes: [Double] = [Double(r), -Double(r)]
            try comm.allReduce(&extremes, op: .max)
            guard extremes == [2, 0] else { throw TestFailure("all-reduce max \(extremes)") }
            var scan: [Int64] = [r + 1]
            try scan.withUnsafeMutableBufferPointer { try comm.exclusiveScanSum($0) }
            guard scan == [[0], [1], [3]][comm.rank] else { throw TestFailure("exscan \(scan)") }
            // all-to-all: rank r sends 100 r + d to d
            let send = (0..<3).map { Int64(100 * comm.rank + $0) }
            var received = [Int64](repeating: -1, count: 3)
            try send.withUnsafeBufferPointer { s in try received.withUnsafeMutableBufferPointer { try comm.allToAll(send: s, recv: $0, blockCount: 1) } }
            guard received == (0..<3).map({ Int64(100 * $0 + comm.rank) }) else { throw TestFailure("all-to-all \(received)") }
            // all-to-all-v: rank r sends r+1 copies of its rank number to every rank
            let rows = [Float](repeating: Float(comm.rank), count: 3 * (comm.rank + 1))
            var into = [Float](repeating: -1, count: 1 + 2 + 3)
            try rows.withUnsafeBufferPointer { s in
                try into.withUnsafeMutableBufferPointer { d in
                    try comm.allToAllV(send: s, sendCounts: Array(repeating: comm.rank + 1, count: 3),
                                       sendOffsets: (0..<3).map { $0 * (comm.rank + 1) },
                                       recv: d, recvCounts: [1, 2, 3], recvOffsets: [0, 1, 3])
                }
            }
            guard into == [0, 1, 1, 2, 2, 2] else { throw TestFailure("all-to-all-v \(into)") }
            // split into even and odd ranks
            let half = try comm.split(color: comm.rank % 2, key: -comm.rank)
            let sum = try half.allReduce(Int64(comm.rank))
            guard half.size == (comm.rank % 2 == 0 ? 2 : 1), sum == (comm.rank % 2 == 0 ? 2 : 1),
                  half.rank == (comm.rank == 2 ? 0 : (comm.rank == 0 ? 1 : 0)) else {
                throw TestFailure("split: size \(half.size) rank \(half.rank) sum \(sum)")
            }
        }
    }

    /// A receiver expecting other counts than its source sends gets an error on every rank.
    func testMismatchedAllToAllVThrowsInsteadOfHanging() {
        XCTAssertThrowsError(try ThreadedCommunicator.run(size: 2) { comm in
            let data = [UInt8](repeating: 1, count: 8)
            var into = [UInt8](repeating: 0, count: 8)
            try data.withUnsafeBytes { s in
                try into.withUnsafeMutableBytes { d in
                    try comm.allToAllV(send: s, sendCounts: [2, 2], sendOffsets: [0, 2], recv: d,
                                       recvCounts: comm.rank == 1 ? [3, 2] : [2, 2], recvOffsets: [0, 4])
                }
            }
        }) { error in XCTAssertTrue("\(error)".contains("rank 0 sends 2 bytes, this rank expects 3"), "\(error)") }
    }
}
