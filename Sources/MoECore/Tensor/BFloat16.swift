import CVectorMath

/// bfloat16: the upper 16 bits of an IEEE binary32 (1 sign, 8 exponent, 7 stored mantissa
/// bits, so 8 significant bits and the same range as Float). Matrix-product inputs are rounded
/// to it in bf16 mode; everything else stays Float.
public struct BFloat16: Sendable, Equatable {
    public var bitPattern: UInt16

    public init(bitPattern: UInt16) { self.bitPattern = bitPattern }

    /// Round to nearest, ties to even; NaN stays a (quiet) NaN, ±inf stays ±inf, and finite
    /// values beyond bf16's largest round to ±inf exactly as IEEE rounding says.
    @inline(__always)
    public init(_ value: Float) {
        let bits = value.bitPattern
        if bits & 0x7FFF_FFFF > 0x7F80_0000 {
            bitPattern = UInt16(truncatingIfNeeded: bits >> 16) | 0x0040
        } else {
            bitPattern = UInt16(truncatingIfNeeded: (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16)
        }
    }

    /// Exact: every bf16 value is a Float.
    @inline(__always)
    public var float: Float { Float(bitPattern: UInt32(bitPattern) << 16) }

    /// Relative rounding error bound of `init(_:)` for normal values: 2^-8 (half an ulp of an
    /// 8-bit significand).
    public static let unitRoundoff: Float = 1.0 / 256

    /// Rounds `count` Floats to bf16, 16 lanes at a time (the same rule as `init(_:)`).
    public static func round(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<BFloat16>, count: Int) {
        BLASInfo.splitElementwise(count) { begin, end in roundPart(source + begin, into: destination + begin, count: end - begin) }
    }

    private static func roundPart(_ source: UnsafePointer<Float>, into destination: UnsafeMutablePointer<BFloat16>, count: Int) {
        let words = UnsafeRawPointer(source)
        let rounding = VectorRounding()
        var index = 0
        while index + 16 <= count {
            rounding.store(words.loadUnaligned(fromByteOffset: index * 4, as: SIMD16<UInt32>.self), into: destination + index)
            index += 16
        }
        while index < count {
            destination[index] = BFloat16(source[index])
            index += 1
        }
    }
}

/// `BFloat16.init(_:)`'s rounding on 16 lanes: the vector form that `BFloat16.round` and the
/// optimizer's fused update share. Made once outside a loop (its constants are vectors).
struct VectorRounding {
    let magnitudeMask = SIMD16<UInt32>(repeating: 0x7FFF_FFFF), infinity = SIMD16<UInt32>(repeating: 0x7F80_0000)
    let half = SIMD16<UInt32>(repeating: 0x7FFF), one = SIMD16<UInt32>(repeating: 1)
    let quiet = SIMD16<UInt32>(repeating: 0x0040_0000)

    /// Rounds 16 Floats, given as bit patterns, and stores their bf16 patterns at `destination`.
    @inline(__always)
    func store(_ bits: SIMD16<UInt32>, into destination: UnsafeMutablePointer<BFloat16>) {
        let rounded = (bits &+ half &+ ((bits &>> 16) & one)) &>> 16
        let nan = (bits & magnitudeMask) .> infinity
        let result = rounded.replacing(with: (bits | quiet) &>> 16, where: nan)
        UnsafeMutableRawPointer(destination).storeBytes(of: swiftmoe_narrow16(result), as: SIMD16<UInt16>.self)
    }
}

/// A growable bf16 buffer for per-step conversions; like `Tensor`, it reallocates only when a
/// request exceeds its capacity, so it stops allocating after warm-up.
public final class BFloat16Buffer {
    public private(set) var pointer: UnsafeMutablePointer<BFloat16>
    private var capacity: Int

    public init() {
        capacity = 1
        pointer = .allocate(capacity: 1)
    }

    deinit { pointer.deallocate() }

    /// Rounds `count` Floats into the buffer and returns it.
    @discardableResult
    public func round(_ source: UnsafePointer<Float>, count: Int) -> UnsafeMutablePointer<BFloat16> {
        reserve(count)
        BFloat16.round(source, into: pointer, count: count)
        return pointer
    }

    /// The buffer, holding at least `count` values (to be written by the caller).
    public func reserved(_ count: Int) -> UnsafeMutablePointer<BFloat16> {
        reserve(count)
        return pointer
    }

    public func reserve(_ count: Int) {
        guard count > capacity else { return }
        pointer.deallocate()
        capacity = grownCapacity(count, from: capacity)
        pointer = .allocate(capacity: capacity)
    }
}
