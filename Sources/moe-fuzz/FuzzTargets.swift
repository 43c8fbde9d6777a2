import Foundation
import MoECore
import MoEIO

/// Fuzz targets for every parser of untrusted bytes, one binary: `FUZZ_TARGET` picks the parser.
/// Built with libFuzzer (`launch/fuzz.sh`: `-sanitize=fuzzer,address -D FUZZING`), libFuzzer
/// drives `LLVMFuzzerTestOneInput`; built plainly, `moe-fuzz TARGET FILE...` replays inputs
/// through the same code (the seed corpus, a finding), which the tests do.
///
/// A target passes when the parser returns or throws; a trap, an overflow, an out-of-bounds read
/// (AddressSanitizer) or a hang (libFuzzer's timeout) is a finding.
enum FuzzTarget: String, CaseIterable {
    case safetensors, manifest, tokenFile = "token_file", tokenizer, config

    func run(_ data: Data) {
        switch self {
        case .safetensors:
            _ = try? Safetensors.File(path: "fuzz.safetensors", data: data)
        case .manifest:
            let decoder = JSONDecoder()
            decoder.keyDecodingStrategy = .convertFromSnakeCase
            if let manifest = try? decoder.decode(CheckpointManifest.self, from: data), manifest.problem == nil {
                _ = try? RunConfig.fromResolved(manifest.config, file: "manifest.json")
            }
        case .tokenFile:
            let path = FuzzTarget.scratch.appendingPathComponent("tokens.bin").path
            guard (try? data.write(to: URL(fileURLWithPath: path))) != nil, let file = try? TokenFile.read(path) else { return }
            file.forEachChunk { _ in }
        case .tokenizer:
            // tokenizer.json or llm.c's file, told apart by content; a loaded one must round-trip.
            guard let tokenizer = try? Tokenizers.load(data, path: "fuzz") else { return }
            let text = Array("To be, or not to be: that is the question.".utf8)
            _ = tokenizer.decode(tokenizer.encode(text))
            _ = tokenizer.decode(Int32(tokenizer.vocabularySize))
        case .config:
            _ = try? RunConfig.fromResolved(String(decoding: data, as: UTF8.self), file: "fuzz.yaml")
        }
    }

    static let scratch: URL = {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("moe-fuzz-\(getpid())")
        try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }()

    /// From `FUZZ_TARGET`, read once.
    static let selected: FuzzTarget = {
        let name = ProcessInfo.processInfo.environment["FUZZ_TARGET"] ?? ""
        guard let target = FuzzTarget(rawValue: name) else {
            fatalError("FUZZ_TARGET='\(name)': expected one of \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return target
    }()
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ bytes: UnsafePointer<UInt8>?, _ count: Int) -> CInt {
    FuzzTarget.selected.run(bytes.map { Data(bytes: $0, count: count) } ?? Data())
    return 0
}

#if FUZZING
/// libFuzzer's driver, entered from this executable's own main (SwiftPM gives every executable
/// one, so libFuzzer's is not linked).
@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(_ argc: UnsafeMutablePointer<CInt>,
                     _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                     _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt
#endif

/// Fuzzing: libFuzzer's command line. Plain: `moe-fuzz TARGET FILE...` replays each file through
/// TARGET's parser.
@main
struct FuzzMain {
    static func main() {
        #if FUZZING
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(runFuzzerDriver(&argc, &argv) { fuzzOneInput($0, $1) })
        #else
        let arguments = CommandLine.arguments.dropFirst()
        guard let name = arguments.first, let target = FuzzTarget(rawValue: name) else {
            print("usage: moe-fuzz {\(FuzzTarget.allCases.map(\.rawValue).joined(separator: "|"))} FILE...")
            exit(64)
        }
        for path in arguments.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else { print("cannot read \(path)"); exit(66) }
            target.run(data)
        }
        print("\(name): \(arguments.count - 1) inputs replayed")
        #endif
    }
}
