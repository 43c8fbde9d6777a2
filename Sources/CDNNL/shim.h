#ifndef SWIFTMOE_CDNNL_SHIM_H
#define SWIFTMOE_CDNNL_SHIM_H
// oneDNN 2.x C API (Debian's libdnnl-dev): matmul primitives for bfloat16 products.
#include <oneapi/dnnl/dnnl.h>

// Debian builds oneDNN on OpenMP (libgomp); its thread count is set through the OpenMP API.
void omp_set_num_threads(int num_threads);
int omp_get_max_threads(void);

// DNNL_RUNTIME_DIM_VAL is INT64_MIN behind a macro Swift does not import.
static inline dnnl_dim_t swiftmoe_dnnl_runtime_dim(void) { return DNNL_RUNTIME_DIM_VAL; }
#endif
