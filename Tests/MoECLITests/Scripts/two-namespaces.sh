#!/usr/bin/env bash
# Runs `mpirun -np 2 MOE ARGS...` with one rank in each of two network namespaces joined by a
# veth pair: two network stacks (and hostnames), as on two machines, talking over real TCP.
# mpirun starts the second rank's daemon through a launch agent that enters the other namespace
# instead of using ssh. Exit status 77: this system does not allow network namespaces.
#
# Usage: two-namespaces.sh WORKDIR MOE ARGS...
set -uo pipefail
workdir="$1"; moe="$2"; shift 2
tag="m$$"
nsA="${tag}a"; nsB="${tag}b"
subnet="10.$(( $$ % 200 + 20 )).$(( ($$ / 200) % 250 )).0"
base="${subnet%.0}"
ipA="$base.1"; ipB="$base.2"

cleanup() { ip netns del "$nsA" 2>/dev/null; ip netns del "$nsB" 2>/dev/null; rm -f "$workdir/agent-$tag.sh"; }
trap cleanup EXIT
if ! ip netns add "$nsA" 2>/dev/null || ! ip netns add "$nsB" 2>/dev/null; then
    echo "network namespaces are not available here (needs root and CAP_SYS_ADMIN)" >&2; exit 77
fi
ip link add "${tag}va" type veth peer name "${tag}vb" || exit 77
ip link set "${tag}va" netns "$nsA" && ip link set "${tag}vb" netns "$nsB" || exit 77
ip -n "$nsA" addr add "$ipA/24" dev "${tag}va" && ip -n "$nsB" addr add "$ipB/24" dev "${tag}vb"
for ns in "$nsA" "$nsB"; do ip -n "$ns" link set lo up; done
ip -n "$nsA" link set "${tag}va" up && ip -n "$nsB" link set "${tag}vb" up

# The launch agent: like ssh, "agent HOST command line"; HOST is an address of the pair.
cat > "$workdir/agent-$tag.sh" <<AGENT
#!/bin/sh
host="\$1"; shift
case "\$host" in
  $ipA) ns=$nsA ;;
  $ipB) ns=$nsB ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$ns; \$*"
AGENT
chmod +x "$workdir/agent-$tag.sh"

cd "$workdir"
ip netns exec "$nsA" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$nsA" \
    env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 \
    mpirun --timeout 120 --host "$ipA,$ipB" -np 2 --mca plm_rsh_agent "$workdir/agent-$tag.sh" \
        --mca btl tcp,self --mca btl_tcp_if_include "$subnet/24" --mca oob_tcp_if_include "$subnet/24" \
        "$moe" "$@"
