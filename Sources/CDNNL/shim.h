#ifndef SWIFTMOE_CDNNL_SHIM_H
#define SWIFTMOE_CDNNL_SHIM_H
// CPU_SET and pthread_setaffinity_np are GNU extensions.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
// oneDNN 2.x C API (Debian's libdnnl-dev): matmul primitives for bfloat16 products.
#include <oneapi/dnnl/dnnl.h>

// Debian builds oneDNN on OpenMP (libgomp); its thread count is set through the OpenMP API.
void omp_set_num_threads(int num_threads);
int omp_get_max_threads(void);
int omp_get_thread_num(void);
int omp_get_num_threads(void);
// libgomp's entry for a parallel region (what `#pragma omp parallel` compiles to), so that a
// region can run here without compiling this module with -fopenmp.
void GOMP_parallel(void (*body)(void *), void *data, unsigned thread_count, unsigned flags);

// DNNL_RUNTIME_DIM_VAL is INT64_MIN behind a macro Swift does not import.
static inline dnnl_dim_t swiftmoe_dnnl_runtime_dim(void) { return DNNL_RUNTIME_DIM_VAL; }

// One element-wise pass split over OpenMP's threads: thread i of n runs body(context, begin, end)
// on the i-th of n contiguous parts of [0, count), part boundaries on multiples of `grain`.
typedef void (*swiftmoe_chunk_body)(void *context, long begin, long end);
struct swiftmoe_parallel_job { swiftmoe_chunk_body body; void *context; long count, grain; };

static void swiftmoe_run_part(void *data) {
    const struct swiftmoe_parallel_job *job = (const struct swiftmoe_parallel_job *)data;
    long parts = omp_get_num_threads(), index = omp_get_thread_num();
    long step = (job->count / parts / job->grain) * job->grain;
    long begin = index * step, end = index == parts - 1 ? job->count : begin + step;
    if (begin < end) job->body(job->context, begin, end);
}

static inline void swiftmoe_parallel_parts(long count, long grain, int threads, swiftmoe_chunk_body body, void *context) {
    struct swiftmoe_parallel_job job = { body, context, count, grain };
    GOMP_parallel(swiftmoe_run_part, &job, (unsigned)threads, 0);
}

static void swiftmoe_idle_part(void *data) { (void)data; }

// An empty parallel region: OpenMP's threads wake, return and poll for the next region (300,000
// polls, libgomp's default, some milliseconds), as they do after each of a step's element-wise
// passes and oneDNN products.
static inline void swiftmoe_wake_openmp_threads(int threads) { GOMP_parallel(swiftmoe_idle_part, 0, (unsigned)threads, 0); }

struct swiftmoe_cpu_list { int cpus[CPU_SETSIZE]; int count; };

// Runs on every thread of the region: OpenMP thread i goes to the i-th allowed CPU.
static void swiftmoe_pin_openmp_thread(void *data) {
    const struct swiftmoe_cpu_list *list = (const struct swiftmoe_cpu_list *)data;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(list->cpus[omp_get_thread_num() % list->count], &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Pins OpenMP's threads (oneDNN's pool, the calling thread as thread 0) one per CPU of the
// process's affinity mask, in order, as OMP_PROC_BIND=close would had it been set before the
// library loaded (libgomp reads its environment only then). Unpinned, the threads migrate
// between the cores and onto the one the calling thread's element-wise work occupies. Returns
// the number of threads pinned: 0 when the mask cannot be read or holds fewer CPUs than threads.
static inline int swiftmoe_pin_openmp_threads(void) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return 0;
    struct swiftmoe_cpu_list list;
    list.count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) if (CPU_ISSET(cpu, &allowed)) list.cpus[list.count++] = cpu;
    int threads = omp_get_max_threads();
    if (list.count < threads || threads < 2) return 0;
    GOMP_parallel(swiftmoe_pin_openmp_thread, &list, (unsigned)threads, 0);
    return threads;
}
#endif
