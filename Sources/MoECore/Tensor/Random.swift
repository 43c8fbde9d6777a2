/// Counter-based random numbers: every draw is a pure function of a key and a counter, so a
/// value depends only on what it is for (seed, step, layer, token, expert), never on how many
/// draws came before or on which rank made them. That is what lets R ranks reproduce 1 rank.
public struct RandomKey: Hashable, Sendable {
    public var value: UInt64

    public init(_ value: UInt64) { self.value = value }

    /// A key derived from this one and an integer (for example a step, a layer or a token).
    /// Overloads rather than a variadic: this runs per token in gates, and variadics allocate.
    @inline(__always)
    public func derive(_ part: Int) -> RandomKey {
        RandomKey(RandomKey.mix(value ^ RandomKey.mix(UInt64(bitPattern: Int64(part)) &+ 0x9E37_79B9_7F4A_7C15)))
    }

    @inline(__always)
    public func derive(_ first: Int, _ second: Int) -> RandomKey { derive(first).derive(second) }

    @inline(__always)
    public func derive(_ first: Int, _ second: Int, _ third: Int) -> RandomKey { derive(first).derive(second).derive(third) }

    /// A key derived from a name (FNV-1a of its UTF-8 bytes), e.g. a parameter's name.
    public func derive(_ name: String) -> RandomKey {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in name.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
        return RandomKey(RandomKey.mix(value ^ hash))
    }

    /// SplitMix64's finaliser: a bijective avalanche mix of 64 bits.
    @inline(__always)
    public static func mix(_ input: UInt64) -> UInt64 {
        var z = input &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    @inline(__always)
    public func bits(_ counter: Int) -> UInt64 {
        RandomKey.mix(value ^ RandomKey.mix(UInt64(bitPattern: Int64(counter))))
    }

    /// Uniform in (0, 1): never exactly 0 or 1, so logarithms are safe.
    @inline(__always)
    public func uniform(_ counter: Int) -> Double {
        (Double(bits(counter) >> 11) + 0.5) * 0x1.0p-53
    }

    /// Uniform integer in 0..<bound.
    @inline(__always)
    public func integer(_ counter: Int, below bound: Int) -> Int {
        precondition(bound > 0)
        return Int(bits(counter).multipliedFullWidth(by: UInt64(bound)).high)
    }

    /// Standard normal (Box-Muller on two uniforms taken at counters 2i and 2i+1).
    public func normal(_ counter: Int) -> Double {
        let u1 = uniform(2 * counter), u2 = uniform(2 * counter + 1)
        return (-2 * _log(u1)).squareRoot() * _cos(2 * Double.pi * u2)
    }

    /// Gumbel(0, 1) = -log(-log u).
    public func gumbel(_ counter: Int) -> Double { -_log(-_log(uniform(counter))) }
}

#if canImport(Glibc)
import Glibc
@inline(__always) func _log(_ x: Double) -> Double { Glibc.log(x) }
@inline(__always) func _cos(_ x: Double) -> Double { Glibc.cos(x) }
#else
import Foundation
@inline(__always) func _log(_ x: Double) -> Double { Foundation.log(x) }
@inline(__always) func _cos(_ x: Double) -> Double { Foundation.cos(x) }
#endif

/// σ(x) = 1 / (1 + e^-x), for the scalar gate weights.
@inline(__always) func sigmoid<T: Scalar>(_ x: T) -> T { 1 / (1 + T(Glibc.exp(-Double(x)))) }
