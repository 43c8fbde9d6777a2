import Foundation

/// One configuration key: how to read it (with validation), write it back, and document it.
/// A section is a list of these; the same list parses files, applies `--set`, writes the
/// resolved config and prints the reference, so the four can never disagree.
public struct ConfigField<Root> {
    public let key: String
    public let help: String
    let read: (inout Root, Any, String) throws -> Void
    let write: (Root) -> String

    public static func int(_ key: String, _ path: WritableKeyPath<Root, Int>, min: Int, max: Int = Int.max,
                           _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            guard let number = ConfigValue.integer(value) else {
                throw ConfigError.invalid(key: name, value: value, expected: "an integer")
            }
            guard number >= min, number <= max else {
                throw ConfigError.invalid(key: name, value: value,
                                          expected: max == Int.max ? "an integer >= \(min)" : "an integer in \(min)...\(max)")
            }
            root[keyPath: path] = number
        }, write: { "\($0[keyPath: path])" })
    }

    public static func double(_ key: String, _ path: WritableKeyPath<Root, Double>, _ range: ClosedRange<Double>,
                              _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            guard let number = ConfigValue.double(value), number.isFinite else {
                throw ConfigError.invalid(key: name, value: value, expected: "a number")
            }
            guard range.contains(number) else {
                throw ConfigError.invalid(key: name, value: value, expected: "a number in \(range.lowerBound)...\(range.upperBound)")
            }
            root[keyPath: path] = number
        }, write: { ConfigValue.format($0[keyPath: path]) })
    }

    /// A number, or `none` (YAML null or the word none) for "no limit".
    public static func optionalDouble(_ key: String, _ path: WritableKeyPath<Root, Double?>, _ range: ClosedRange<Double>,
                                      _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            if value is NSNull || (value as? String)?.lowercased() == "none" { root[keyPath: path] = nil; return }
            guard let number = ConfigValue.double(value), number.isFinite, range.contains(number) else {
                throw ConfigError.invalid(key: name, value: value,
                                          expected: "a number in \(range.lowerBound)...\(range.upperBound) or none")
            }
            root[keyPath: path] = number
        }, write: { $0[keyPath: path].map(ConfigValue.format) ?? "none" })
    }

    /// An integer, or `auto` (nil) for "decided at start".
    public static func optionalInt(_ key: String, _ path: WritableKeyPath<Root, Int?>, min: Int, _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            if (value as? String)?.lowercased() == "auto" { root[keyPath: path] = nil; return }
            guard let number = ConfigValue.integer(value), number >= min else {
                throw ConfigError.invalid(key: name, value: value, expected: "an integer >= \(min) or auto")
            }
            root[keyPath: path] = number
        }, write: { $0[keyPath: path].map { "\($0)" } ?? "auto" })
    }

    public static func bool(_ key: String, _ path: WritableKeyPath<Root, Bool>, _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            guard let flag = value as? Bool else { throw ConfigError.invalid(key: name, value: value, expected: "true or false") }
            root[keyPath: path] = flag
        }, write: { "\($0[keyPath: path])" })
    }

    public static func string(_ key: String, _ path: WritableKeyPath<Root, String>, allowEmpty: Bool = true,
                              _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            guard let text = value as? String ?? (value is NSNull && allowEmpty ? "" : nil), allowEmpty || !text.isEmpty else {
                throw ConfigError.invalid(key: name, value: value, expected: "a string")
            }
            root[keyPath: path] = text
        }, write: { ConfigValue.quote($0[keyPath: path]) })
    }

    /// Paths: one string (empty: none) or a YAML list of strings. Written as the single path or a
    /// flow list.
    public static func paths(_ key: String, _ path: WritableKeyPath<Root, [String]>, allowEmpty: Bool = true,
                             _ help: String) -> ConfigField {
        ConfigField(key: key, help: help, read: { root, value, name in
            let paths: [String]?
            if let text = value as? String { paths = text.isEmpty ? [] : [text] } else if value is NSNull { paths = [] } else {
                paths = (value as? [Any]).flatMap { list in
                    let strings = list.compactMap { $0 as? String }
                    return strings.count == list.count && !strings.contains("") ? strings : nil
                }
            }
            guard let paths, allowEmpty || !paths.isEmpty else {
                throw ConfigError.invalid(key: name, value: value, expected: "a path, a glob or a list of them")
            }
            root[keyPath: path] = paths
        }, write: { root in
            let paths = root[keyPath: path]
            return paths.count == 1 ? ConfigValue.quote(paths[0]) : "[" + paths.map(ConfigValue.quote).joined(separator: ", ") + "]"
        })
    }

    /// A typed choice: the YAML string must be one of `Choice`'s raw values, which the help
    /// lists after the text (so a new case shows in `--print-config` and the reference config).
    public static func choice<Choice: RawRepresentable & CaseIterable>(_ key: String, _ path: WritableKeyPath<Root, Choice>,
                                                                      _ help: String) -> ConfigField where Choice.RawValue == String {
        let allowed = Choice.allCases.map(\.rawValue)
        return ConfigField(key: key, help: help + " [" + allowed.joined(separator: " | ") + "]", read: { root, value, name in
            guard let text = value as? String, let choice = Choice(rawValue: text) else {
                throw ConfigError.invalid(key: name, value: value, expected: "one of \(allowed.joined(separator: ", "))")
            }
            root[keyPath: path] = choice
        }, write: { $0[keyPath: path].rawValue })
    }
}

/// A named group of fields, e.g. `train:`.
public struct ConfigSection<Config> {
    public let name: String
    public let help: String
    let fields: [AnyField<Config>]

    public init<Section>(_ name: String, _ path: WritableKeyPath<Config, Section>, help: String,
                         _ fields: [ConfigField<Section>]) {
        self.name = name
        self.help = help
        self.fields = fields.map { field in
            AnyField(key: field.key, help: field.help,
                     read: { config, value, fullName in try field.read(&config[keyPath: path], value, fullName) },
                     write: { config in field.write(config[keyPath: path]) })
        }
    }

    public var keys: [String] { fields.map(\.key) }
}

struct AnyField<Config> {
    let key: String
    let help: String
    let read: (inout Config, Any, String) throws -> Void
    let write: (Config) -> String
}

enum ConfigValue {
    static func integer(_ value: Any) -> Int? {
        if value is Bool { return nil }
        if let number = value as? Int { return number }
        if let number = value as? Double, number.rounded() == number, abs(number) < 1e15 { return Int(number) }
        if let text = value as? String { return Int(text) }
        return nil
    }

    static func double(_ value: Any) -> Double? {
        if value is Bool { return nil }
        if let number = value as? Double { return number }
        if let number = value as? Int { return Double(number) }
        if let text = value as? String { return Double(text) }
        return nil
    }

    static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(format: "%.1f", value) : "\(value)"
    }

    static func quote(_ text: String) -> String {
        let escaped = text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        return "\"\(escaped)\""
    }

    static func describe(_ value: Any) -> String {
        if value is NSNull { return "null" }
        if value is [String: Any] { return "a mapping" }
        if value is [Any] { return "a list" }
        return "'\(value)'"
    }
}

public enum ConfigError: Error, CustomStringConvertible, Equatable {
    case unreadable(file: String, reason: String)
    case syntax(file: String, reason: String)
    case notAMapping(file: String, key: String)
    case unknownKey(key: String, known: [String], file: String?)
    case invalidValue(key: String, detail: String)
    case badOverride(String)
    case inconsistent(String)

    static func invalid(key: String, value: Any, expected: String) -> ConfigError {
        .invalidValue(key: key, detail: "got \(ConfigValue.describe(value)), expected \(expected)")
    }

    public var description: String {
        switch self {
        case let .unreadable(file, reason): return "config file '\(file)': cannot read it (\(reason))"
        case let .syntax(file, reason): return "config file '\(file)': not valid YAML (\(reason))"
        case let .notAMapping(file, key):
            return "config file '\(file)': '\(key)' must be a mapping of keys to values"
        case let .unknownKey(key, known, file):
            let place = file.map { " in '\($0)'" } ?? ""
            return "unknown config key '\(key)'\(place); valid keys here: \(known.joined(separator: ", "))"
        case let .invalidValue(key, detail): return "config key '\(key)': \(detail)"
        case let .badOverride(text): return "--set '\(text)': expected key=value with a dotted key, e.g. train.steps=100"
        case let .inconsistent(text): return "config: \(text)"
        }
    }
}
