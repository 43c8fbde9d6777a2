#if canImport(Glibc)
import Glibc
#endif

/// Input files are read only when they are regular files. `stat` says what a path is without
/// opening it: opening a FIFO for reading blocks until a writer comes (forever, for a run), and a
/// directory or a device reads as nothing or without end.
public enum RegularFile {
    /// Why a path is not a regular file to read.
    public enum Problem: CustomStringConvertible, Equatable {
        case missing
        /// Something other than a regular file, in words: "a directory, not a file", "a FIFO, ...".
        case notARegularFile(String)
        /// `stat` failed otherwise (its error).
        case unreadable(String)

        public var description: String {
            switch self {
            case .missing: return "no such file"
            case let .notARegularFile(what), let .unreadable(what): return what
            }
        }
    }

    /// nil when `path` (symbolic links followed) is a regular file; otherwise what it is instead.
    public static func problem(_ path: String) -> Problem? {
        var status = stat()
        guard stat(path, &status) == 0 else { return errno == ENOENT ? .missing : .unreadable(String(cString: strerror(errno))) }
        switch status.st_mode & S_IFMT {
        case S_IFREG: return nil
        case S_IFDIR: return .notARegularFile("a directory, not a file")
        case S_IFIFO: return .notARegularFile("a FIFO, not a regular file")
        case S_IFSOCK: return .notARegularFile("a socket, not a regular file")
        case S_IFCHR, S_IFBLK: return .notARegularFile("a device, not a regular file")
        default: return .notARegularFile("not a regular file")
        }
    }
}
