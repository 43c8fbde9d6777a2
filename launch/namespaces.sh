# Two network namespaces joined by a veth pair stand for two machines; mpirun starts the second
# rank's daemon through a launch agent that enters the other namespace instead of using ssh.
# Sourced by launch/bench-network.sh and by the tests' Tests/MoECLITests/Scripts/two-namespaces.sh.
#
#   namespace_pair TAG WORKDIR   creates namespaces TAGa and TAGb, the veth pair TAGva-TAGvb and
#                                WORKDIR/agent.sh; sets nsA nsB vethA vethB ipA ipB subnet.
#                                Returns 77 (with a message) where namespaces are not allowed.
#   namespace_pair_remove        deletes both namespaces (the veth pair goes with them).
#   namespace_mpirun ARGS...     mpirun from inside nsA with one host per namespace, the agent and
#                                TCP over the pair's subnet; ARGS are further mpirun arguments and
#                                the command. RANKS_PER_HOST (default 1) ranks run in each namespace.

namespace_pair() {
    local tag="$1" workdir="$2"
    nsA="${tag}a"; nsB="${tag}b"; vethA="${tag}va"; vethB="${tag}vb"
    subnet="10.$(( $$ % 200 + 20 )).$(( ($$ / 200) % 250 )).0"
    ipA="${subnet%.0}.1"; ipB="${subnet%.0}.2"
    agent="$workdir/agent.sh"
    if ! ip netns add "$nsA" 2>/dev/null || ! ip netns add "$nsB" 2>/dev/null; then
        echo "network namespaces are not allowed here (needs root and CAP_SYS_ADMIN)" >&2; return 77
    fi
    ip link add "$vethA" type veth peer name "$vethB" && ip link set "$vethA" netns "$nsA" && ip link set "$vethB" netns "$nsB" \
        || { echo "cannot create a veth pair here" >&2; return 77; }
    ip -n "$nsA" addr add "$ipA/24" dev "$vethA" && ip -n "$nsB" addr add "$ipB/24" dev "$vethB" || return 1
    for ns in "$nsA" "$nsB"; do ip -n "$ns" link set lo up; done
    ip -n "$nsA" link set "$vethA" up && ip -n "$nsB" link set "$vethB" up || return 1
    # The launch agent, called like ssh: "agent HOST command line"; HOST is an address of the pair.
    cat > "$agent" <<AGENT
#!/bin/sh
host="\$1"; shift
case "\$host" in
  $ipA) ns=$nsA ;;
  $ipB) ns=$nsB ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$ns; \$*"
AGENT
    chmod +x "$agent"
}

namespace_pair_remove() {
    ip netns del "$nsA" 2>/dev/null
    ip netns del "$nsB" 2>/dev/null
    return 0
}

# Each namespace's daemon would bind its one rank to "its" first core, the same core for both:
# the ranks are left unbound (the kernel spreads them over the cores).
namespace_mpirun() {
    local per="${RANKS_PER_HOST:-1}"
    ip netns exec "$nsA" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$nsA" \
        env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        mpirun --host "$ipA:$per,$ipB:$per" -np $(( 2 * per )) --oversubscribe --bind-to none --mca plm_rsh_agent "$agent" \
            --mca btl tcp,self --mca btl_tcp_if_include "$subnet/24" --mca oob_tcp_if_include "$subnet/24" "$@"
}
