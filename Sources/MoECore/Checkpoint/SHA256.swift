import CVectorMath
import Foundation

/// SHA-256 (FIPS 180-4), for checkpoint file digests. Small enough to own rather than pull in a
/// cryptography package; checked against the standard test vectors in the tests. Whole blocks go
/// through the CPU's SHA instructions where it has them (sha256_ni.h, about ten times the
/// portable code's speed), else through the portable compression below.
public struct SHA256 {
    /// Whether whole blocks use the SHA instructions (tests switch it off to check the portable path).
    static var usesHardware = swiftmoe_sha256_ni_supported() != 0

    private var state: [UInt32] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ]
    private var pending: [UInt8] = []
    private var length: UInt64 = 0
    private var schedule = [UInt32](repeating: 0, count: 64)   // reused by every block

    private static let roundConstants: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ]

    public init() {}

    public static func hex<Bytes: Sequence>(of bytes: Bytes) -> String where Bytes.Element == UInt8 {
        var hasher = SHA256()
        hasher.update(bytes)
        return hasher.finalizeHex()
    }

    /// The digest of a whole buffer (checkpoint files), read in 64-byte blocks.
    public static func hex(of data: Data) -> String {
        var hasher = SHA256()
        data.withUnsafeBytes { hasher.update($0) }
        return hasher.finalizeHex()
    }

    public mutating func update<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        for byte in bytes {
            pending.append(byte)
            length &+= 1
            if pending.count == 64 {
                pending.withUnsafeBytes { compress($0.baseAddress!) }
                pending.removeAll(keepingCapacity: true)
            }
        }
    }

    /// Faster path for contiguous buffers: whole blocks straight from the buffer.
    public mutating func update(_ buffer: UnsafeRawBufferPointer) {
        var index = 0
        while !pending.isEmpty && index < buffer.count { update(CollectionOfOne(buffer[index])); index += 1 }
        let blocks = (buffer.count - index) / 64
        if blocks > 0 && SHA256.usesHardware {
            state.withUnsafeMutableBufferPointer {
                swiftmoe_sha256_ni_blocks($0.baseAddress!, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self) + index, blocks)
            }
            length &+= UInt64(64 * blocks)
            index += 64 * blocks
        }
        while index + 64 <= buffer.count {
            length &+= 64
            compress(buffer.baseAddress! + index)
            index += 64
        }
        update(buffer[index...])
    }

    public mutating func finalizeHex() -> String {
        let bitLength = length &* 8
        update(CollectionOfOne(UInt8(0x80)))
        while pending.count != 56 { update(CollectionOfOne(UInt8(0))) }
        for shift in stride(from: 56, through: 0, by: -8) { update(CollectionOfOne(UInt8(truncatingIfNeeded: bitLength >> UInt64(shift)))) }
        let digits = Array("0123456789abcdef")
        var text = ""
        for word in state { for shift in stride(from: 28, through: 0, by: -4) { text.append(digits[Int((word >> UInt32(shift)) & 0xf)]) } }
        return text
    }

    /// One 64-byte block at `block`.
    private mutating func compress(_ block: UnsafeRawPointer) {
        var w = schedule
        schedule = []   // keep `w` uniquely referenced: no copy on write
        defer { schedule = w }
        for t in 0..<16 { w[t] = UInt32(bigEndian: block.loadUnaligned(fromByteOffset: 4 * t, as: UInt32.self)) }
        for t in 16..<64 {
            let s0 = rotate(w[t - 15], 7) ^ rotate(w[t - 15], 18) ^ (w[t - 15] >> 3)
            let s1 = rotate(w[t - 2], 17) ^ rotate(w[t - 2], 19) ^ (w[t - 2] >> 10)
            w[t] = w[t - 16] &+ s0 &+ w[t - 7] &+ s1
        }
        var a = state[0], b = state[1], c = state[2], d = state[3], e = state[4], f = state[5], g = state[6], h = state[7]
        for t in 0..<64 {
            let t1 = h &+ (rotate(e, 6) ^ rotate(e, 11) ^ rotate(e, 25)) &+ ((e & f) ^ (~e & g)) &+ SHA256.roundConstants[t] &+ w[t]
            let t2 = (rotate(a, 2) ^ rotate(a, 13) ^ rotate(a, 22)) &+ ((a & b) ^ (a & c) ^ (b & c))
            h = g; g = f; f = e; e = d &+ t1; d = c; c = b; b = a; a = t1 &+ t2
        }
        state[0] &+= a; state[1] &+= b; state[2] &+= c; state[3] &+= d
        state[4] &+= e; state[5] &+= f; state[6] &+= g; state[7] &+= h
    }

    @inline(__always) private func rotate(_ x: UInt32, _ n: UInt32) -> UInt32 { x >> n | x << (32 - n) }
}
