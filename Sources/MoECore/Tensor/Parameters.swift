#if canImport(Glibc)
import Glibc
#endif

/// Marker: parameters every rank holds an identical copy of (embeddings, attention, norms,
/// routers). Their gradients are all-reduced each step.
public enum Replicated {}
/// Marker: parameters of the experts this rank hosts. Never part of the global all-reduce.
public enum ExpertSharded {}

/// How a parameter starts.
public enum Initialization: Sendable, Equatable {
    case zeros
    case ones
    case normal(standardDeviation: Double)
    /// Normal truncated at two standard deviations (resampled, deterministically).
    case truncatedNormal(standardDeviation: Double)
    case uniform(bound: Double)
}

/// What a parameter is for. Gradient buckets, EvoMoE's recipe, FLOP counting, freezing and
/// the optimizer's resets read the role (and the block), never the name, which is only the key
/// on disk (checkpoints, export).
public enum ParameterRole: String, Sendable, CaseIterable {
    case tokenEmbedding, positionEmbedding, norm, attention
    /// The feed-forward network of a block without experts.
    case feedForward
    /// EvoMoE's dense FFN at an MoE position: trained until the spawn, frozen after.
    case denseFeedForward
    case expert
    /// A gate's linear router weight, its bias, and the other tables gates learn or keep
    /// (BASE and StableMoE centroids, hash and distilled tables).
    case router, routerBias, routingTable
    case head
}

/// A parameter's name (its key on disk) with its role and the block it belongs to (nil outside
/// the blocks: embeddings, the final norm, the head).
public struct ParameterPath: Sendable {
    public let name: String
    public let role: ParameterRole
    public let block: Int?

    public init(_ name: String, role: ParameterRole, block: Int? = nil) {
        self.name = name
        self.role = role
        self.block = block
    }

    /// `name.component` in the same block, with the same role unless another is given.
    public func appending(_ component: String, role: ParameterRole? = nil) -> ParameterPath {
        ParameterPath(name + "." + component, role: role ?? self.role, block: block)
    }
}

public struct ParameterEntry: Sendable {
    public let name: String
    public let role: ParameterRole
    /// The block the parameter belongs to (nil: embeddings, final norm, head).
    public let block: Int?
    public let rows: Int
    public let columns: Int
    public let offset: Int
    /// AdamW applies decoupled weight decay only where this is set (matrices, not norms,
    /// biases or embeddings unless configured).
    public let weightDecay: Bool
    public let initialization: Initialization
    /// Read only as an operand of matrix products (through the bf16 copy in bf16 mode), never
    /// element by element: a sharded optimizer in bf16 mode need not keep its fp32 values whole.
    public let productOnly: Bool
    public var count: Int { rows * columns }
}

/// All parameters of one kind in one contiguous slab, with gradients in a parallel slab of the
/// same layout. One slab means one fused all-reduce and one optimizer loop.
///
/// `Kind` (`Replicated` or `ExpertSharded`) is a phantom type: the compiler, not a tag, keeps
/// expert parameters out of the global all-reduce.
public final class ParameterStore<T: Scalar, Kind> {
    public private(set) var values: UnsafeMutablePointer<T>
    public private(set) var gradients: UnsafeMutablePointer<T>
    public private(set) var count = 0
    public private(set) var entries: [ParameterEntry] = []
    private var capacity = 0
    private var indexByName: [String: Int] = [:]

    public init() {
        values = .allocate(capacity: 1)
        gradients = .allocate(capacity: 1)
    }

    deinit {
        if mappedBytes > 0 { munmap(values, mappedBytes) } else { values.deallocate() }
        gradients.deallocate()
        bfloat16Values?.deallocate()
    }

    /// bf16 mode: a bf16 copy of `values` (same layout). nil in fp32 mode and for Double stores.
    public private(set) var bfloat16Values: UnsafeMutablePointer<BFloat16>?
    /// The oneDNN engine the store's matrix products run on: bf16 mode, or fp32 mode where
    /// oneDNN measured faster than OpenBLAS. nil: OpenBLAS (fp32, and every Double store).
    public private(set) var matmul: OneDNNMatmul?

    /// The engine of attention's per-(sequence, head) products where the store's own products
    /// run on OpenBLAS: oneDNN's fp32 batched matmul where it measured faster than OpenBLAS's
    /// GEMM per head (`KernelChoice.headKernel`).
    public private(set) var headProductMatmul: OneDNNMatmul?
    /// Where attention's per-head products run: `matmul`, else `headProductMatmul`; nil:
    /// OpenBLAS, one GEMM per (sequence, head).
    public var attentionMatmul: OneDNNMatmul? { matmul ?? headProductMatmul }

    /// Runs attention's per-head products on `matmul` (fp32) while the store's own products
    /// stay on OpenBLAS.
    public func runHeadProducts(on matmul: OneDNNMatmul) {
        precondition(T.self == Float.self && matmul.precision == .fp32, "oneDNN fp32 products need Float weights")
        headProductMatmul = matmul
    }

    /// Runs the store's matrix products on `matmul`, in its precision (after the model is
    /// built: the slab is final). bf16 adds the rounded copy of the values.
    public func runProducts(on matmul: OneDNNMatmul) {
        precondition(T.self == Float.self, "oneDNN products need Float weights")
        self.matmul = matmul
        guard matmul.precision == .bf16 else { return }
        bfloat16Values?.deallocate()
        bfloat16Values = .allocate(capacity: max(count, 1))
        refreshBFloat16()
    }

    /// Re-rounds the bf16 copy from the fp32 master values, after they were written other than
    /// by the optimizer (which updates the copy with the values): initialisation, a checkpoint
    /// load, EvoMoE's spawn. All of it, or the values this rank keeps (`keptValues`).
    public func refreshBFloat16() {
        for range in keptValues ?? [0..<count] { refreshBFloat16(range) }
    }

    /// Re-rounds `range` of the bf16 copy.
    public func refreshBFloat16(_ range: Range<Int>) {
        guard let bfloat16Values else { return }
        BFloat16.round(asFloat(UnsafePointer(values)) + range.lowerBound, into: bfloat16Values + range.lowerBound, count: range.count)
    }

    /// The flat ranges of `values` this rank keeps (sorted, disjoint), or nil when it keeps them
    /// all. Set by `keepValues(only:)`: ZeRO stage 1 in bf16 mode.
    public private(set) var keptValues: [Range<Int>]?
    /// Bytes of the anonymous mapping `values` lives in once `keepValues` moved it there (0: the
    /// ordinary allocation).
    private var mappedBytes = 0

    /// bf16 mode with a sharded optimizer: this rank keeps only `kept` of the fp32 master values
    /// (its optimizer slice and the tensors read in fp32); the pages wholly outside them go back
    /// to the operating system and read as zero until written again. The products read the bf16
    /// copy, which is refreshed from all values first, so call this when every value is valid;
    /// after writing them all again (a checkpoint load, EvoMoE's spawn) `didWriteAllValues`
    /// releases the same pages again. Throws when the values' own mapping cannot be made.
    public func keepValues(only kept: [Range<Int>]) throws {
        precondition(bfloat16Values != nil, "only the bf16 copy can stand in for released master values")
        precondition(zip(kept, kept.dropFirst()).allSatisfy { $0.upperBound <= $1.lowerBound }, "kept ranges are sorted and disjoint")
        if mappedBytes == 0 {
            // An anonymous mapping of its own, so that pages can be released without touching
            // memory the allocator hands out.
            let bytes = (max(count, 1) * MemoryLayout<T>.stride + pageSize - 1) / pageSize * pageSize
            guard let region = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                  region != MAP_FAILED else { throw ParameterMemoryError(bytes: bytes, errno: errno) }
            let mapped = region.bindMemory(to: T.self, capacity: max(count, 1))
            mapped.moveInitialize(from: values, count: count)
            values.deallocate()
            values = mapped
            mappedBytes = bytes
        }
        keptValues = kept
        didWriteAllValues()
    }

    /// After every value was written other than by the optimizer (initialisation, a checkpoint
    /// load, EvoMoE's spawn): the bf16 copy follows them, and the values this rank does not keep
    /// are released again.
    public func didWriteAllValues() {
        let kept = keptValues
        keptValues = nil
        refreshBFloat16()
        keptValues = kept
        releaseValuesNotKept()
    }

    /// Returns the pages of the values this rank does not keep to the operating system again
    /// (after they were gathered whole to be read); nothing when it keeps them all.
    public func releaseValuesNotKept() {
        guard let kept = keptValues else { return }
        var released = 0
        for range in kept + [count..<count] {
            releasePages(released..<range.lowerBound)
            released = max(released, range.upperBound)
        }
    }

    private let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Returns the whole pages inside `range` of `values` to the operating system.
    private func releasePages(_ range: Range<Int>) {
        guard !range.isEmpty else { return }
        let base = Int(bitPattern: UnsafeRawPointer(values))
        let start = (base + range.lowerBound * MemoryLayout<T>.stride + pageSize - 1) / pageSize * pageSize
        let end = (base + range.upperBound * MemoryLayout<T>.stride) / pageSize * pageSize
        guard end > start else { return }
        madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, MADV_DONTNEED)
    }

    /// Adds a parameter. Only while building a model: the slab may move, so hold `Parameter`
    /// handles (store + offset), never raw pointers across a call to `add`.
    public func add(_ path: ParameterPath, rows: Int, columns: Int, weightDecay: Bool,
                    initialization: Initialization, productOnly: Bool = false) -> Parameter<T, Kind> {
        let name = path.name
        precondition(indexByName[name] == nil, "duplicate parameter \(name)")
        precondition(bfloat16Values == nil, "parameters are added before bf16 is enabled")
        let entry = ParameterEntry(name: name, role: path.role, block: path.block, rows: rows, columns: columns, offset: count,
                                   weightDecay: weightDecay, initialization: initialization, productOnly: productOnly)
        reserve(count + entry.count)
        (values + count).initialize(repeating: 0, count: entry.count)
        (gradients + count).initialize(repeating: 0, count: entry.count)
        indexByName[name] = entries.count
        entries.append(entry)
        count += entry.count
        return Parameter(store: self, offset: entry.offset, rows: rows, columns: columns)
    }

    private func reserve(_ needed: Int) {
        guard needed > capacity else { return }
        let newCapacity = max(needed, capacity * 2, 1024)
        for keyPath in [\ParameterStore.values, \ParameterStore.gradients] {
            let grown = UnsafeMutablePointer<T>.allocate(capacity: newCapacity)
            grown.moveInitialize(from: self[keyPath: keyPath], count: count)
            self[keyPath: keyPath].deallocate()
            self[keyPath: keyPath] = grown
        }
        capacity = newCapacity
    }

    public func entry(named name: String) -> ParameterEntry? { indexByName[name].map { entries[$0] } }

    public func parameter(named name: String) -> Parameter<T, Kind>? {
        entry(named: name).map { Parameter(store: self, offset: $0.offset, rows: $0.rows, columns: $0.columns) }
    }

    /// The index of a parameter handle's entry (a handle comes from `add`, so it has one).
    public func entryIndex(of parameter: Parameter<T, Kind>) -> Int {
        guard let index = entries.firstIndex(where: { $0.offset == parameter.offset }) else {
            preconditionFailure("no parameter at offset \(parameter.offset) in this store")
        }
        return index
    }

    /// The indices of the entries with `role` (in block `block`, when given).
    public func entryIndices(role: ParameterRole, block: Int? = nil) -> Set<Int> {
        Set(entries.indices.filter { entries[$0].role == role && (block == nil || entries[$0].block == block) })
    }

    public func zeroGradients() { gradients.update(repeating: 0, count: count) }

    /// Fills every parameter from its initialisation rule, keyed by its name: the same name
    /// gets the same values on every rank and for any number of ranks.
    public func initialize(key: RandomKey) {
        for entry in entries {
            let destination = values + entry.offset
            let stream = key.derive(entry.name)
            switch entry.initialization {
            case .zeros: destination.update(repeating: 0, count: entry.count)
            case .ones: destination.update(repeating: 1, count: entry.count)
            case let .normal(deviation):
                for index in 0..<entry.count { destination[index] = T(stream.normal(index) * deviation) }
            case let .truncatedNormal(deviation):
                for index in 0..<entry.count {
                    var attempt = 0, value = stream.normal(index)
                    while abs(value) > 2 { attempt += 1; value = stream.derive(attempt).normal(index) }
                    destination[index] = T(value * deviation)
                }
            case let .uniform(bound):
                for index in 0..<entry.count { destination[index] = T((2 * stream.uniform(index) - 1) * bound) }
            }
        }
    }
}

/// A handle to one parameter tensor `[rows, columns]` in a store.
public struct Parameter<T: Scalar, Kind> {
    public unowned(unsafe) let store: ParameterStore<T, Kind>
    public let offset: Int
    public let rows: Int
    public let columns: Int

    public var count: Int { rows * columns }
    @inline(__always) public var value: UnsafeMutablePointer<T> { store.values + offset }
    @inline(__always) public var gradient: UnsafeMutablePointer<T> { store.gradients + offset }
    /// The bf16 copy of the value, in bf16 mode.
    @inline(__always) public var bfloat16Value: UnsafeMutablePointer<BFloat16>? { store.bfloat16Values.map { $0 + offset } }
}

/// The parameter values' memory mapping could not be made (out of memory, or a limit).
public struct ParameterMemoryError: Error, CustomStringConvertible {
    public let bytes: Int
    public let errno: Int32
    public var description: String {
        "cannot map \(bytes) bytes for the replicated parameter values: \(String(cString: strerror(errno))) (out of memory?)"
    }
}
