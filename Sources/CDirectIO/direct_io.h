#ifndef SWIFTMOE_DIRECT_IO_H
#define SWIFTMOE_DIRECT_IO_H
// O_DIRECT for checkpoint files (DurableFile.swift): glibc declares it only under _GNU_SOURCE,
// which Swift's Glibc module does not define, and its value differs between architectures.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>

static inline int swiftmoe_o_direct(void) {
#ifdef O_DIRECT
    return O_DIRECT;
#else
    return 0;
#endif
}
#endif
