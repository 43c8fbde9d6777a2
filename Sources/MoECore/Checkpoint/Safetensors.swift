import Foundation

/// The safetensors format (huggingface/safetensors): an 8-byte little-endian header length n,
/// n bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
/// and the raw little-endian tensor bytes. Checkpoints are F32; an export may write BF16; an
/// import reads F32, BF16 and F16 (widened to Float).
public enum Safetensors {
    public enum DataType: String, Sendable {
        case f32 = "F32", bf16 = "BF16", f16 = "F16"
        var bytes: Int { self == .f32 ? 4 : 2 }
    }

    /// One tensor to write: `values` holds product(shape) floats.
    public struct Entry {
        public var name: String
        public var shape: [Int]
        public var values: UnsafeBufferPointer<Float>
        public init(name: String, shape: [Int], values: UnsafeBufferPointer<Float>) {
            precondition(shape.reduce(1, *) == values.count, "\(name): shape \(shape) does not match \(values.count) values")
            self.name = name
            self.shape = shape
            self.values = values
        }
    }

    public struct TensorInfo: Equatable {
        public var shape: [Int]
        /// Byte range inside the data section.
        public var begin: Int
        public var end: Int
        public var dataType: DataType = .f32
    }

    public enum FormatError: Error, CustomStringConvertible {
        case malformed(path: String, reason: String)
        case missingTensor(path: String, name: String)
        case shapeMismatch(path: String, name: String, found: [Int], expected: [Int])
        public var description: String {
            switch self {
            case let .malformed(path, reason): return "safetensors file '\(path)': \(reason)"
            case let .missingTensor(path, name): return "safetensors file '\(path)': no tensor named '\(name)'"
            case let .shapeMismatch(path, name, found, expected):
                return "safetensors file '\(path)': tensor '\(name)' has shape \(found), expected \(expected)"
            }
        }
    }

    /// Largest header we accept: far above any real model's, small enough that a hostile length
    /// cannot make us allocate absurd memory.
    public static let maximumHeaderBytes = 100 << 20

    /// With `.bf16` every value is rounded to nearest even.
    public static func encode(_ entries: [Entry], metadata: [String: String] = [:], dataType: DataType = .f32) throws -> Data {
        let (json, dataBytes) = try header(entries, metadata: metadata, dataType: dataType)
        var data = Data(capacity: 8 + json.count + dataBytes)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { data.append(contentsOf: $0) }
        data.append(json)
        for entry in entries {
            switch dataType {
            case .f32:
                data.append(UnsafeBufferPointer(start: UnsafeRawPointer(entry.values.baseAddress!).assumingMemoryBound(to: UInt8.self),
                                                count: entry.values.count * 4))
            case .bf16:
                var rounded = [UInt16](repeating: 0, count: entry.values.count)
                for index in rounded.indices { rounded[index] = BFloat16(entry.values[index]).bitPattern.littleEndian }
                rounded.withUnsafeBytes { data.append(contentsOf: $0) }
            case .f16:
                var rounded = [UInt16](repeating: 0, count: entry.values.count)
                for index in rounded.indices { rounded[index] = Float16(entry.values[index]).bitPattern.littleEndian }
                rounded.withUnsafeBytes { data.append(contentsOf: $0) }
            }
        }
        return data
    }

    /// F32 into `buffer`'s memory (an asynchronous save's snapshot, reused from save to save):
    /// the same bytes as `encode`, returned as Data that does not own them; valid until the
    /// buffer's next use.
    static func encode(_ entries: [Entry], metadata: [String: String] = [:], into buffer: SnapshotBuffer) throws -> Data {
        let (json, dataBytes) = try header(entries, metadata: metadata, dataType: .f32)
        let region = try buffer.region(bytes: 8 + json.count + dataBytes)
        region.storeBytes(of: UInt64(json.count).littleEndian, as: UInt64.self)
        json.copyBytes(to: region.baseAddress!.advanced(by: 8).assumingMemoryBound(to: UInt8.self), count: json.count)
        var offset = 8 + json.count
        for entry in entries {
            let bytes = entry.values.count * 4
            (region.baseAddress! + offset).copyMemory(from: entry.values.baseAddress!, byteCount: bytes)
            offset += bytes
        }
        return Data(bytesNoCopy: region.baseAddress!, count: region.count, deallocator: .none)
    }

    /// The JSON header, padded so the data section starts 8-byte aligned (allowed by the
    /// format), and the data section's size.
    private static func header(_ entries: [Entry], metadata: [String: String], dataType: DataType) throws -> (json: Data, dataBytes: Int) {
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var offset = 0
        for entry in entries {
            let bytes = entry.values.count * dataType.bytes
            header[entry.name] = ["dtype": dataType.rawValue, "shape": entry.shape, "data_offsets": [offset, offset + bytes]] as [String: Any]
            offset += bytes
        }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while (8 + json.count) % 8 != 0 { json.append(0x20) }
        return (json, offset)
    }

    /// Parses and validates the header of a whole file's bytes: every tensor F32, shapes
    /// consistent with byte ranges, ranges inside the data and not overlapping.
    /// `dataTypes`: those accepted (checkpoints: F32 only).
    public static func parseHeader(_ data: Data, path: String,
                                   dataTypes: Set<String> = ["F32"]) throws -> (tensors: [String: TensorInfo], metadata: [String: String], dataStart: Int) {
        guard data.count >= 8 else { throw FormatError.malformed(path: path, reason: "\(data.count) bytes is shorter than the 8-byte header length") }
        let headerLength = data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard headerLength <= UInt64(min(maximumHeaderBytes, data.count - 8)) else {
            throw FormatError.malformed(path: path, reason: "header length \(headerLength) exceeds the file (\(data.count) bytes) or the \(maximumHeaderBytes)-byte limit")
        }
        let dataStart = 8 + Int(headerLength)
        guard let object = try? JSONSerialization.jsonObject(with: data.subdata(in: 8..<dataStart)),
              let header = object as? [String: Any] else {
            throw FormatError.malformed(path: path, reason: "header is not a JSON object")
        }
        let dataBytes = data.count - dataStart
        var tensors: [String: TensorInfo] = [:]
        var metadata: [String: String] = [:]
        for (name, value) in header {
            if name == "__metadata__" {
                guard let map = value as? [String: String] else { throw FormatError.malformed(path: path, reason: "__metadata__ is not a string map") }
                metadata = map
                continue
            }
            guard let info = value as? [String: Any], let dtype = info["dtype"] as? String,
                  let shape = info["shape"] as? [Int], let offsets = info["data_offsets"] as? [Int], offsets.count == 2 else {
                throw FormatError.malformed(path: path, reason: "tensor '\(name)' lacks dtype, shape or data_offsets")
            }
            guard dataTypes.contains(dtype), let dataType = DataType(rawValue: dtype) else {
                throw FormatError.malformed(path: path, reason: "tensor '\(name)' has dtype \(dtype); SwiftMoE reads \(dataTypes.sorted().joined(separator: ", ")) here")
            }
            guard shape.allSatisfy({ $0 >= 0 && $0 < 1 << 40 }), offsets[0] >= 0, offsets[0] <= offsets[1], offsets[1] <= dataBytes else {
                throw FormatError.malformed(path: path, reason: "tensor '\(name)' has data_offsets \(offsets) outside the \(dataBytes)-byte data section")
            }
            // Bytes = element size · Π shape, every product checked: a header is untrusted input,
            // and a shape whose size overflows must be refused, not trap.
            let (bytes, overflow) = shape.reduce((dataType.bytes, false)) { partial, dimension in
                let product = partial.0.multipliedReportingOverflow(by: dimension)
                return (product.partialValue, partial.1 || product.overflow)
            }
            guard !overflow, bytes == offsets[1] - offsets[0] else {
                throw FormatError.malformed(path: path, reason: "tensor '\(name)': shape \(shape) does not match its \(offsets[1] - offsets[0]) bytes")
            }
            tensors[name] = TensorInfo(shape: shape, begin: offsets[0], end: offsets[1], dataType: dataType)
        }
        let ranges = tensors.values.filter { $0.end > $0.begin }.sorted { $0.begin < $1.begin }
        for (first, second) in zip(ranges, ranges.dropFirst()) where second.begin < first.end {
            throw FormatError.malformed(path: path, reason: "tensors overlap at byte \(second.begin)")
        }
        return (tensors, metadata, dataStart)
    }

    /// A parsed file held in memory.
    public struct File {
        public let path: String
        public let data: Data
        public let tensors: [String: TensorInfo]
        public let metadata: [String: String]
        let dataStart: Int

        public init(path: String, dataTypes: Set<String> = ["F32"]) throws {
            guard let data = FileManager.default.contents(atPath: path) else {
                throw FormatError.malformed(path: path, reason: "cannot read it (missing or unreadable)")
            }
            try self.init(path: path, data: data, dataTypes: dataTypes)
        }

        public init(path: String, data: Data, dataTypes: Set<String> = ["F32"]) throws {
            self.path = path
            self.data = data
            (tensors, metadata, dataStart) = try Safetensors.parseHeader(data, path: path, dataTypes: dataTypes)
        }

        /// The first tensor (in name order) holding a NaN or an infinity, if any.
        public func firstNonFiniteTensor() -> String? {
            data.withUnsafeBytes { raw in
                tensors.sorted { $0.key < $1.key }.first { _, info in
                    var copy = [Float](repeating: 0, count: (info.end - info.begin) / 4)
                    copy.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[(dataStart + info.begin)..<(dataStart + info.end)])) }
                    return copy.contains { !$0.isFinite }
                }?.key
            }
        }

        /// Copies tensor `name` into `destination` after checking it has `shape`.
        public func read(_ name: String, shape: [Int], into destination: UnsafeMutablePointer<Float>) throws {
            guard let info = tensors[name] else { throw FormatError.missingTensor(path: path, name: name) }
            guard info.shape == shape else { throw FormatError.shapeMismatch(path: path, name: name, found: info.shape, expected: shape) }
            data.withUnsafeBytes { raw in
                let source = raw.baseAddress! + dataStart + info.begin, count = (info.end - info.begin) / info.dataType.bytes
                switch info.dataType {
                case .f32: UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: info.end - info.begin)
                case .bf16:
                    for index in 0..<count {
                        destination[index] = BFloat16(bitPattern: UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))).float
                    }
                case .f16:
                    for index in 0..<count {
                        destination[index] = Float(Float16(bitPattern: UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))))
                    }
                }
            }
        }
    }
}
