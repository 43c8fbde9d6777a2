/// A row-major 2-D buffer of `rows x columns` scalars.
///
/// Higher-rank activations are flattened into rows, with the full shape named in the doc
/// comment of whoever owns them (e.g. attention scores `[B*nh*T, T]`). `resize` reallocates only
/// when the new size exceeds the capacity, and then grows it by half again: buffers whose size
/// varies from step to step (an expert's received rows) stop allocating after a few steps
/// instead of reallocating, and page-faulting fresh memory, at every new maximum.
public final class Tensor<T: Scalar> {
    public private(set) var rows: Int
    public private(set) var columns: Int
    public private(set) var capacity: Int
    public private(set) var pointer: UnsafeMutablePointer<T>

    public var count: Int { rows * columns }

    public init(rows: Int = 0, columns: Int = 0) {
        precondition(rows >= 0 && columns >= 0)
        self.rows = rows
        self.columns = columns
        self.capacity = max(rows * columns, 1)
        self.pointer = .allocate(capacity: capacity)
        pointer.initialize(repeating: 0, count: capacity)
    }

    public convenience init(rows: Int, columns: Int, values: [T]) {
        precondition(values.count == rows * columns, "values do not fill [\(rows), \(columns)]")
        self.init(rows: rows, columns: columns)
        for index in values.indices { pointer[index] = values[index] }
    }

    deinit { pointer.deallocate() }

    /// Changes the shape; contents are unspecified afterwards unless `zero` is set.
    public func resize(rows: Int, columns: Int, zero: Bool = false) {
        let needed = rows * columns
        if needed > capacity {
            pointer.deallocate()
            capacity = grownCapacity(needed, from: capacity)
            pointer = .allocate(capacity: capacity)
            pointer.initialize(repeating: 0, count: capacity)
        } else if zero {
            pointer.update(repeating: 0, count: needed)
        }
        self.rows = rows
        self.columns = columns
    }

    public func zero() { pointer.update(repeating: 0, count: count) }

    public subscript(row: Int, column: Int) -> T {
        get { pointer[row * columns + column] }
        set { pointer[row * columns + column] = newValue }
    }

    public func row(_ index: Int) -> UnsafeMutablePointer<T> { pointer + index * columns }

    public var array: [T] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}

/// The capacity a growing buffer reallocates to: what is needed, but at least half again the
/// old capacity, so sizes that vary from step to step settle after a few reallocations.
@inline(__always)
func grownCapacity(_ needed: Int, from capacity: Int) -> Int { max(needed, capacity + capacity / 2) }

/// Makes `array` hold at least `count` elements, growing it as `Tensor.resize` grows (contents
/// not kept, new elements `value`): per-step index and scalar buffers stop reallocating after a
/// few steps.
func growBuffer<E>(_ array: inout [E], toHold count: Int, filling value: E) {
    if array.count < count { array = Array(repeating: value, count: grownCapacity(count, from: array.count)) }
}
