#ifndef SWIFTMOE_CMPI_SHIM_H
#define SWIFTMOE_CMPI_SHIM_H
// OpenMPI's C++ bindings break Swift's C++ interop mode; we only use the C API.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

// OpenMPI's handles are macros that cast addresses of incomplete structs, which Swift cannot
// import. These accessors return them as ordinary values.
static inline MPI_Comm swiftmoe_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Datatype swiftmoe_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype swiftmoe_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype swiftmoe_int64(void) { return MPI_INT64_T; }
static inline MPI_Datatype swiftmoe_byte(void) { return MPI_BYTE; }
static inline MPI_Op swiftmoe_op_sum(void) { return MPI_SUM; }
static inline MPI_Op swiftmoe_op_max(void) { return MPI_MAX; }
static inline MPI_Op swiftmoe_op_min(void) { return MPI_MIN; }
static inline void *swiftmoe_in_place(void) { return MPI_IN_PLACE; }
static inline MPI_Status *swiftmoe_status_ignore(void) { return MPI_STATUS_IGNORE; }
static inline int swiftmoe_success(void) { return MPI_SUCCESS; }
static inline MPI_Errhandler swiftmoe_errors_return(void) { return MPI_ERRORS_RETURN; }
static inline MPI_Request swiftmoe_request_null(void) { return MPI_REQUEST_NULL; }
static inline MPI_Status *swiftmoe_statuses_ignore(void) { return MPI_STATUSES_IGNORE; }
#endif
