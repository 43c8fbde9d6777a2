#!/usr/bin/env bash
# Runs `mpirun -np 2 MOE ARGS...` with one rank in each of two network namespaces joined by a
# veth pair: two network stacks (and hostnames), as on two machines, talking over real TCP
# (launch/namespaces.sh). Exit status 77: this system does not allow network namespaces.
#
# Usage: two-namespaces.sh WORKDIR MOE ARGS...
set -uo pipefail
workdir="$1"; moe="$2"; shift 2
source "$(dirname "$0")/../../../launch/namespaces.sh"
trap 'namespace_pair_remove; rm -f "$agent"' EXIT
namespace_pair "m$$" "$workdir" || exit $?
cd "$workdir"
namespace_mpirun --timeout 120 -x OPENBLAS_NUM_THREADS=1 "$moe" "$@"
