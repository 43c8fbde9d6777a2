#if canImport(Glibc)
import Glibc
#endif

/// Input files are read only when they are regular files. `stat` says what a path is without
/// opening it: opening a FIFO for reading blocks until a writer comes (forever, for a run), and a
/// directory or a device reads as nothing or without end.
public enum RegularFile {
    /// nil when `path` (symbolic links followed) is a regular file; otherwise what it is instead,
    /// in words for an error message: "no such file", "a directory", "a FIFO", ...
    public static func problem(_ path: String) -> String? {
        var status = stat()
        guard stat(path, &status) == 0 else { return errno == ENOENT ? "no such file" : String(cString: strerror(errno)) }
        switch status.st_mode & S_IFMT {
        case S_IFREG: return nil
        case S_IFDIR: return "a directory, not a file"
        case S_IFIFO: return "a FIFO, not a regular file"
        case S_IFSOCK: return "a socket, not a regular file"
        case S_IFCHR, S_IFBLK: return "a device, not a regular file"
        default: return "not a regular file"
        }
    }
}
