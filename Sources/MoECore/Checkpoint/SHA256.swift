import CVectorMath
import Foundation

/// SHA-256 (FIPS 180-4), for checkpoint file digests. Small enough to own rather than pull in a
/// cryptography package; checked against the standard test vectors in the tests. Blocks go
/// through the CPU's SHA instructions where it has them (sha256_ni.h, several times the portable
/// compression's speed), else through the portable compression in the same header.
public struct SHA256 {
    /// Whether whole blocks use the SHA instructions (tests switch it off to check the portable path).
    static var usesHardware = swiftmoe_sha256_ni_supported() != 0

    private var state: [UInt32] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ]
    private var pending: [UInt8] = []
    private var length: UInt64 = 0

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
        if blocks > 0 {
            compress(buffer.baseAddress! + index, blocks: blocks)
            length &+= UInt64(64 * blocks)
            index += 64 * blocks
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

    /// Compresses `blocks` 64-byte blocks at `start` (sha256_ni.h).
    private mutating func compress(_ start: UnsafeRawPointer, blocks: Int = 1) {
        let bytes = start.assumingMemoryBound(to: UInt8.self)
        state.withUnsafeMutableBufferPointer {
            if SHA256.usesHardware {
                swiftmoe_sha256_ni_blocks($0.baseAddress!, bytes, blocks)
            } else {
                swiftmoe_sha256_portable_blocks($0.baseAddress!, bytes, blocks)
            }
        }
    }
}
