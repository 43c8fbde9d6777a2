#ifndef SWIFTMOE_CBLAS_SHIM_H
#define SWIFTMOE_CBLAS_SHIM_H
#include <cblas.h>
// Declared by OpenBLAS's cblas.h; repeated here in case a distribution's header omits them.
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
char *openblas_get_corename(void);
#endif
