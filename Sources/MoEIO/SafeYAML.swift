import Foundation
import Yams

/// YAML from untrusted text (config files, a checkpoint's embedded config, `--set` values), read
/// within limits the YAML library does not keep: it expands aliases without bound (a few lines
/// can stand for gigabytes), recurses once per nesting level (deep nesting overflows the stack)
/// and lets a repeated key silently replace the first. A config needs none of these, so they are
/// refused before or while parsing, each with a one-line `ConfigError` naming the file.
public enum SafeYAML {
    /// Larger than any config (the reference config is a few kilobytes).
    public static let maximumBytes = 1 << 20
    /// Configs nest two levels; 32 leaves room for any value a key takes.
    public static let maximumDepth = 32

    /// The parsed document (nil when empty), or a `ConfigError` naming `file`.
    public static func load(_ text: String, file: String) throws -> Any? {
        guard text.utf8.count <= maximumBytes else {
            throw ConfigError.syntax(file: file, reason: "\(text.utf8.count) bytes is more than a config's \(maximumBytes)")
        }
        try scan(text, file: file)
        let node: Node?
        do { node = try Yams.compose(yaml: text) } catch {
            throw ConfigError.syntax(file: file, reason: "\(error)".split(separator: "\n").first.map(String.init) ?? "")
        }
        guard let node else { return nil }
        try checkKeys(node, file: file, path: "")
        return Constructor.default.any(from: node)
    }

    /// Refuses anchors and aliases and nesting deeper than `maximumDepth`, by a lexical pass that
    /// skips quoted scalars and comments: indentation, block-sequence dashes and open flow
    /// brackets each count as one level (an over-estimate of the real depth, never an under-one).
    static func scan(_ text: String, file: String) throws {
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let characters = Array(line.utf8)
            var index = 0, depth = 0, flow = 0, quote: UInt8? = nil, atTokenStart = true
            while index < characters.count, characters[index] == UInt8(ascii: " ") { index += 1; depth += 1 }
            while index < characters.count {
                let character = characters[index]
                if let open = quote {
                    if character == open { quote = nil }
                    if character == UInt8(ascii: "\\") && open == UInt8(ascii: "\"") { index += 1 }
                } else if character == UInt8(ascii: "\"") || character == UInt8(ascii: "'") {
                    if atTokenStart { quote = character }
                } else if character == UInt8(ascii: "#") && atTokenStart {
                    break
                } else if (character == UInt8(ascii: "&") || character == UInt8(ascii: "*")) && atTokenStart {
                    throw ConfigError.syntax(file: file, reason: "line \(number + 1) uses a YAML anchor or alias, which a config does not allow")
                } else if character == UInt8(ascii: "[") || character == UInt8(ascii: "{") {
                    flow += 1
                } else if character == UInt8(ascii: "]") || character == UInt8(ascii: "}") {
                    flow = max(0, flow - 1)
                } else if character == UInt8(ascii: "-") && atTokenStart {
                    depth += 1
                }
                if depth + flow > maximumDepth {
                    throw ConfigError.syntax(file: file, reason: "line \(number + 1) nests deeper than \(maximumDepth) levels")
                }
                let separator = [UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "["), UInt8(ascii: "{"), UInt8(ascii: ","),
                                 UInt8(ascii: ":"), UInt8(ascii: "-")].contains(character)
                atTokenStart = quote == nil && separator
                index += 1
            }
        }
    }

    /// Refuses a mapping that repeats a key (at any depth), naming the key, and keys that are
    /// not plain values (`? [a, b]: 1` or a merge key `<<`): the YAML library's constructor
    /// force-unwraps a key's string and would crash on them.
    static func checkKeys(_ node: Node, file: String, path: String) throws {
        switch node {
        case let .mapping(mapping):
            var seen: Set<String> = []
            for (key, value) in mapping {
                guard key.scalar != nil, key.string != "<<" else {
                    let at = path.isEmpty ? "the top level" : "'\(path)'"
                    throw ConfigError.syntax(file: file, reason: "a key at \(at) is not a plain value (a complex or merge key), which a config does not allow")
                }
                let name = key.string ?? "\(key)"
                let qualified = path.isEmpty ? name : path + "." + name
                guard seen.insert(name).inserted else {
                    throw ConfigError.syntax(file: file, reason: "key '\(qualified)' appears twice")
                }
                try checkKeys(value, file: file, path: qualified)
            }
        case let .sequence(sequence):
            for element in sequence { try checkKeys(element, file: file, path: path) }
        default:
            break
        }
    }
}
