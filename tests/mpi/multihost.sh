#!/bin/bash
# Expert parallelism across hosts, on one machine: two test hosts made as network namespaces
# (h0 = 10.213.77.1, h1 = 10.213.77.2, each with its own hostname through unshare --uts), joined
# by a bridge that lives in a third namespace, so that the machine's own network, addresses and
# firewall are neither used nor touched. Two ranks per host; every message between hosts goes
# over TCP on that /24.
#
#   multihost.sh mpi   MPIEXEC TEST_EP_MPI           Open MPI across the hosts (rsh agent: ip netns exec)
#   multihost.sh torch PYTHON EP_WORKER PACKAGE_DIR  torch.distributed (gloo) across the hosts
#   multihost.sh bench MPIEXEC PROGRAM ARGS...       PROGRAM on 2 hosts x 2 ranks (bench/ep_multihost.sh);
#                                                    its stdout passes through, everything else on stderr
#
# Each run checks that the ranks really ran on both hosts, then runs the expert-parallel checks
# (one layer on the global batch; a missing rank hits the deadline). The namespaces are removed
# on every exit, failures included. Exits 77 (skipped, with the reason) where namespaces cannot
# be made: not root, no ip/unshare, or a kernel or container that refuses them.
set -u
SKIP=77
skip() { echo "SKIPPED: $*"; exit $SKIP; }
fail() { echo "FAIL: $*"; exit 1; }

mode=${1:-}
[ "$mode" = mpi ] || [ "$mode" = torch ] || [ "$mode" = bench ] ||
  { echo "usage: $0 mpi MPIEXEC TEST | torch PYTHON WORKER PKGDIR | bench MPIEXEC PROGRAM ARGS..."; exit 2; }
# bench: stdout is the program's alone (JSON); this script's own lines go to stderr.
if [ "$mode" = bench ]; then exec 3>&1 1>&2; else exec 3>&1; fi
shift
[ "$(id -u)" = 0 ] || skip "network namespaces need root (this is uid $(id -u))"
for tool in ip unshare hostname; do command -v $tool >/dev/null || skip "$tool is not installed"; done

NET=10.213.77
id=moe$$
HOSTS=(h0 h1)
NS=(${id}h0 ${id}h1)
SW=${id}sw
work=$(mktemp -d)
children=()  # what runs on the test hosts: stopped before the namespaces go
# `ip netns add` makes /run/netns a mount point and leaves it so; when this script made it one and
# no namespace is left in it, the mount goes too (a chroot cannot be removed under it).
netns_was_mounted=0
mountpoint -q /run/netns 2>/dev/null && netns_was_mounted=1
cleanup() {
  for p in "${children[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${children[@]}"; do wait "$p" 2>/dev/null; done
  for n in "${NS[@]}" "$SW"; do ip netns del "$n" 2>/dev/null; done
  if [[ $netns_was_mounted == 0 && -z $(ls -A /run/netns 2>/dev/null) ]]; then
    for _ in 1 2 3; do mountpoint -q /run/netns 2>/dev/null && umount /run/netns 2>/dev/null; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if ! ip netns add "$SW" 2>"$work/err"; then skip "cannot create a network namespace: $(cat "$work/err")"; fi
ip -n "$SW" link set lo up
ip -n "$SW" link add br0 type bridge 2>"$work/err" || skip "cannot create a bridge: $(cat "$work/err")"
ip -n "$SW" link set br0 up
for i in 0 1; do
  ns=${NS[$i]}
  ip netns add "$ns" || fail "ip netns add $ns"
  ip link add "${id}p$i" type veth peer name eth0 netns "$ns" 2>"$work/err" || skip "cannot create a veth pair: $(cat "$work/err")"
  ip link set "${id}p$i" netns "$SW"
  ip -n "$SW" link set "${id}p$i" master br0 up
  ip -n "$ns" addr add "$NET.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done

# at HOST_INDEX: sets AT to the prefix that runs a command on that test host (its namespace, its
# hostname), bounded in time. Every link execs the next, so the pid of "${AT[@]}" CMD & is the
# timeout process, which passes a TERM on to CMD.
at() { AT=(ip netns exec "${NS[$1]}" unshare --uts sh -c 'hostname "$0" && exec "$@"' "${HOSTS[$1]}" timeout 100); }
# started: records the last background command for cleanup.
started() { children+=("$!"); }

if command -v ping >/dev/null; then
  at 0
  "${AT[@]}" ping -c 1 -W 5 "$NET.2" >"$work/ping" 2>&1 || fail "h0 cannot reach h1 over the bridge: $(cat "$work/ping")"
fi

if [ "$mode" = mpi ] || [ "$mode" = bench ]; then
  mpiexec=$1 test=$2
  shift 2
  # What Open MPI runs instead of ssh: "agent [options] HOST COMMAND..."; COMMAND is for a shell.
  cat >"$work/agent" <<EOF
#!/bin/sh
while [ "\${1#-}" != "\$1" ]; do shift; done
host=\$1; shift
case \$host in
  $NET.1|h0) ns=${NS[0]} name=h0 ;;
  $NET.2|h1) ns=${NS[1]} name=h1 ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec \$ns unshare --uts sh -c "hostname \$name && \$*"
EOF
  chmod +x "$work/agent"
  printf '%s slots=2\n%s slots=2\n' "$NET.1" "$NET.2" >"$work/hostfile"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
  # In the background, waited for: a signal then reaches the trap at once.
  run() {
    at 0
    "${AT[@]}" "$mpiexec" --hostfile "$work/hostfile" -np 4 --mca plm_rsh_agent "$work/agent" \
      --mca plm_rsh_no_tree_spawn 1 --mca btl tcp,vader,self \
      --mca oob_tcp_if_include "$NET.0/24" --mca btl_tcp_if_include "$NET.0/24" "$@" &
    started
    wait "$!"
  }
  # stdout only: mpirun may warn on stderr (e.g. that it could not set the agent's process group).
  run hostname >"$work/where" 2>"$work/where.err" || fail "mpirun across the hosts failed: $(cat "$work/where" "$work/where.err")"
  cat "$work/where.err"
  where=$(cat "$work/where")
  echo "ranks ran on: $(echo "$where" | sort | tr '\n' ' ')"
  [ "$(echo "$where" | sort | tr '\n' ' ')" = "h0 h0 h1 h1 " ] || fail "expected two ranks on each of h0 and h1, got: $where"
  SECONDS=0
  if [ "$mode" = bench ]; then
    run "$test" "$@" >&3 || fail "$test across two hosts failed"
    echo "$(basename "$test") over 2 hosts x 2 ranks: ran in ${SECONDS} s"
  else
    run "$test" || fail "test_ep_mpi across two hosts failed"
    echo "test_ep_mpi over 2 hosts x 2 ranks: ok in ${SECONDS} s"
  fi
else
  python=$1 worker=$2 pkgdir=$3
  export PYTHONPATH=$pkgdir${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=eth0 PYTHONDONTWRITEBYTECODE=1
  "$python" -c 'import torch.distributed as d, sys; sys.exit(0 if d.is_available() and d.is_gloo_available() else 1)' ||
    skip "$python's torch has no torch.distributed with gloo"
  [ -f "$pkgdir/libmoe/capi.py" ] || skip "the libmoe Python package was not built in $pkgdir"
  # ranks SIZE MODE ARGS...: SIZE ranks of the worker, rank r on host r*2/SIZE; all must report ok.
  ranks() {
    local size=$1 mode=$2 pids=() status=0 r
    shift 2
    for ((r = 0; r < size; r++)); do
      at $((r * 2 / size))
      "${AT[@]}" "$python" "$worker" "$mode" $r "$size" "tcp://$NET.1:29533" "$@" >"$work/$mode$r.log" 2>&1 &
      started
      pids+=($!)
    done
    for ((r = 0; r < size; r++)); do wait "${pids[$r]}" || status=1; done
    for ((r = 0; r < size; r++)); do echo "--- $mode: rank $r ---"; cat "$work/$mode$r.log"; done
    [ $status = 0 ] || fail "a torch.distributed rank failed ($mode)"
    for ((r = 0; r < size; r++)); do
      grep -q "rank $r of $size: $mode: ok (0 failed checks) on h$((r * 2 / size))" "$work/$mode$r.log" ||
        fail "rank $r did not report ok from h$((r * 2 / size)) ($mode)"
    done
  }
  SECONDS=0
  ranks 4 equal
  echo "torch.distributed (gloo) over 2 hosts x 2 ranks, against one layer on the global batch: ok in ${SECONDS} s"
  SECONDS=0
  ranks 2 deadline 3 "$work/done"
  echo "torch.distributed (gloo), h1 skips a forward: h0 raised CommError within the group's 3 s timeout: ok in ${SECONDS} s"
fi
