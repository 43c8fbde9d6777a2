import Foundation
import XCTest
@testable import MoECore
import MoEComm
import MoEIO

final class CheckpointFormatTests: XCTestCase {
    /// The standard vectors through both compressions (the CPU's SHA instructions where it has
    /// them, and the portable code), and both on a long odd-sized buffer fed in uneven pieces.
    func testSHA256StandardVectors() throws {
        let hardware = SHA256.usesHardware
        defer { SHA256.usesHardware = hardware }
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        XCTAssertEqual(hardware, cpuinfo.contains(" sha_ni"), "the SHA instructions are used exactly where the CPU has them")
        let noise = (0..<1_000_003).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        var digests: [String] = []
        for useHardware in hardware ? [true, false] : [false] {
            SHA256.usesHardware = useHardware
            func digest(_ bytes: [UInt8]) -> String { bytes.withUnsafeBytes { SHA256.hex(of: Data($0)) } }
            XCTAssertEqual(digest(Array("".utf8)), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            XCTAssertEqual(digest(Array("abc".utf8)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            XCTAssertEqual(digest(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)),
                           "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
            XCTAssertEqual(digest([UInt8](repeating: 0x61, count: 1_000_000)), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
            var hasher = SHA256()
            noise.withUnsafeBytes { bytes in
                var start = 0
                for piece in [1, 63, 64, 65, 1000, 12_345] { hasher.update(UnsafeRawBufferPointer(rebasing: bytes[start..<(start + piece)])); start += piece }
                hasher.update(UnsafeRawBufferPointer(rebasing: bytes[start...]))
            }
            digests.append(hasher.finalizeHex())
            XCTAssertEqual(digests.last, SHA256.hex(of: noise), "pieces and the byte-wise path agree")
        }
        XCTAssertEqual(Set(digests).count, 1, "the two compressions agree: \(digests)")
    }

    /// Checkpoint files go past the page cache where the file system allows it: every size
    /// around the 4 KiB blocks and the 32 MiB chunks, from aligned and unaligned memory, on disk
    /// and on tmpfs (no O_DIRECT there), reads back byte for byte with the digest of the bytes
    /// written; a failing write names the file and the system's reason.
    func testDurableFilesRoundTripAtEveryAlignment() throws {
        let directories = [NSTemporaryDirectory(), "/dev/shm"].filter { FileManager.default.isWritableFile(atPath: $0) }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 70 << 20, alignment: DurableFile.alignment)
        defer { buffer.deallocate() }
        for index in 0..<(70 << 20) { buffer.storeBytes(of: UInt8(truncatingIfNeeded: index &* 7919 >> 5), toByteOffset: index, as: UInt8.self) }
        for directory in directories {
            let path = (directory as NSString).appendingPathComponent("durable-\(getpid())")
            defer { try? FileManager.default.removeItem(atPath: path) }
            for (count, shift) in [(0, 0), (1, 0), (4095, 0), (4096, 0), (4097, 0), (DurableFile.chunkBytes * 2 + 12_345, 0), (100_000, 3)] {
                let bytes = UnsafeRawBufferPointer(start: buffer + shift, count: count)
                var synced = false
                try DurableFile.write(bytes, to: path, beforeSync: { synced = true })
                XCTAssertTrue(synced)
                let label = "\(count) bytes at offset \(shift) in \(directory)"
                XCTAssertEqual(FileManager.default.contents(atPath: path), Data(bytes), label)
                let record = try DurableFile.record(of: path)
                XCTAssertEqual(record.bytes, count, label)
                XCTAssertEqual(record.sha256, SHA256.hex(of: Data(bytes)), label)
            }
        }
        // A file that does not read back as written (changed behind the writer) is an error,
        // and the digest words a writer reports survive the all-reduce's Int64 encoding.
        let changed = (NSTemporaryDirectory() as NSString).appendingPathComponent("changed-\(getpid())")
        defer { try? FileManager.default.removeItem(atPath: changed) }
        XCTAssertThrowsError(try DurableFile.write(UnsafeRawBufferPointer(start: buffer, count: 10_000), to: changed, beforeSync: {
            let handle = try XCTUnwrap(FileHandle(forWritingAtPath: changed))
            try handle.seek(toOffset: 9_000)
            try handle.write(contentsOf: Data([0xAB, 0xCD]))
            try handle.close()
        })) { XCTAssertTrue("\($0)".contains("reads back different"), "\($0)") }
        let digest = SHA256.hex(of: Data(UnsafeRawBufferPointer(start: buffer, count: 10_000)))
        XCTAssertEqual(Checkpoint.digestHex((0..<4).map { Checkpoint.digestWord(digest, $0) }), digest)
        XCTAssertThrowsError(try DurableFile.write(UnsafeRawBufferPointer(start: buffer, count: 8192), to: "/dev/full", beforeSync: {})) {
            XCTAssertTrue("\($0)".contains("/dev/full") && "\($0)".contains("No space left on device"), "\($0)")
        }
        XCTAssertThrowsError(try DurableFile.record(of: "/nonexistent/shard.safetensors")) {
            XCTAssertTrue("\($0)".contains("/nonexistent/shard.safetensors"), "\($0)")
        }
    }

    func testSafetensorsRoundTrip() throws {
        let a: [Float] = (0..<6).map { Float($0) * 0.5 }, b: [Float] = [-1, 2, 3.25]
        let data = try a.withUnsafeBufferPointer { pa in
            try b.withUnsafeBufferPointer { pb in
                try Safetensors.encode([.init(name: "a", shape: [2, 3], values: pa), .init(name: "b", shape: [3], values: pb)],
                                       metadata: ["format": "pt"])
            }
        }
        let file = try Safetensors.File(path: "memory", data: data)
        XCTAssertEqual(file.tensors["a"]?.shape, [2, 3])
        XCTAssertEqual(file.metadata["format"], "pt")
        var out = [Float](repeating: 0, count: 3)
        try out.withUnsafeMutableBufferPointer { try file.read("b", shape: [3], into: $0.baseAddress!) }
        XCTAssertEqual(out, b)
        XCTAssertThrowsError(try out.withUnsafeMutableBufferPointer { try file.read("a", shape: [3], into: $0.baseAddress!) })
        XCTAssertEqual((8 + Int(data.withUnsafeBytes { $0.load(as: UInt64.self) })) % 8, 0, "data section 8-byte aligned")
        // Checkpoints encode into a snapshot's memory: the same bytes.
        let snapshot = SnapshotBuffer()
        let intoSnapshot = try a.withUnsafeBufferPointer { pa in
            try b.withUnsafeBufferPointer { pb in
                try Safetensors.encode([.init(name: "a", shape: [2, 3], values: pa), .init(name: "b", shape: [3], values: pb)],
                                       metadata: ["format": "pt"], into: snapshot)
            }
        }
        XCTAssertEqual(Data(intoSnapshot), data)
    }

    /// Hostile files give errors, never crashes or huge allocations.
    func testSafetensorsRejectsHostileHeaders() throws {
        func header(_ json: String, dataBytes: Int = 0) -> Data {
            var data = Data()
            withUnsafeBytes(of: UInt64(json.utf8.count).littleEndian) { data.append(contentsOf: $0) }
            data.append(Data(json.utf8))
            data.append(Data(count: dataBytes))
            return data
        }
        var absurd = Data()
        withUnsafeBytes(of: UInt64(1) << 62) { absurd.append(contentsOf: $0) }
        let hostile: [(Data, String)] = [
            (Data([1, 2, 3]), "shorter than"),
            (absurd, "header length"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", dataBytes: 8), "outside"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", dataBytes: 16), "does not match"),
            (header("{\"a\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}}", dataBytes: 8), "dtype"),
            (header("[1,2]"), "not a JSON object"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627775,1099511627775],\"data_offsets\":[0,4]}}", dataBytes: 4), "does not match"),
            // 2^61 elements: the element count fits in Int, its bytes (x 4) do not (used to trap).
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1073741824,2147483648],\"data_offsets\":[0,4]}}", dataBytes: 4), "does not match"),
            (header("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", dataBytes: 12), "overlap"),
        ]
        for (data, expected) in hostile {
            XCTAssertThrowsError(try Safetensors.File(path: "x.safetensors", data: data)) { error in
                XCTAssertTrue("\(error)".contains(expected) && "\(error)".contains("x.safetensors"), "\(error)")
            }
        }
        // Random mutations of a valid file: every outcome is a parse or an error.
        let values: [Float] = (0..<32).map(Float.init)
        let valid = try values.withUnsafeBufferPointer { try Safetensors.encode([.init(name: "w", shape: [4, 8], values: $0)]) }
        let key = RandomKey(11)
        for trial in 0..<2000 {
            var mutated = valid
            for flip in 0..<(1 + key.derive(trial).integer(0, below: 4)) {
                let index = key.derive(trial).integer(1 + flip, below: mutated.count)
                mutated[index] = UInt8(key.derive(trial).integer(10 + flip, below: 256))
            }
            if key.derive(trial).integer(99, below: 5) == 0 { mutated = mutated.prefix(key.derive(trial).integer(98, below: mutated.count)) }
            _ = try? Safetensors.File(path: "fuzz", data: Data(mutated))
        }
    }
}
