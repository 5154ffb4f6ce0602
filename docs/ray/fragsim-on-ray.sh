#!/usr/bin/env bash
# fragsim on Ray: a head, worker nodes, and `fragsim serve --ray` as the Ray driver.
# Copy it and change the paths and addresses; each step says on which host it runs.
# Every host needs fragsim with the extra (pip install 'fragsim[ray]') in the same Python as Ray.
set -euo pipefail

HEAD_IP=${HEAD_IP:-10.0.0.1}
RUN_DIR=${RUN_DIR:-/shared/runs/r1}      # on a shared filesystem, or copy bundles/ to each node (--bundles)
SOURCE=${SOURCE:-/models/smollm2}        # where every node keeps its copy of the source checkpoint

# Every host, before `ray start` and before fragsim: Ray's defaults declare a lost node dead
# after ~63 s; these make it ~4.5 s (fragsim's own heartbeats notice a dead agent sooner, but a
# lost node's actor is moved only once Ray says the node is gone). Token auth: the same secret
# on every node and on the driver (Ray 2.52+).
export RAY_health_check_period_ms=500 RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=3
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:?set one secret for the whole cluster}

step=${1:-}
case "$step" in
  plan)    # on the head: the run directory and one owner-only bundle per fragment
    fragsim plan --model "$SOURCE" --fragments 4 --out "$RUN_DIR" --bind "tcp://0.0.0.0:5555" ;;
  head)    # on the head: Ray binds all interfaces; the coordinator's ROUTER binds $HEAD_IP:5555
    ray start --head --node-ip-address "$HEAD_IP" --port 6379 --num-cpus 0 ;;
  worker)  # on each worker; optionally declare which fragments it holds: those go only there
    ray start --address "$HEAD_IP:6379" ${FRAGMENTS_RESOURCES:+--resources "$FRAGMENTS_RESOURCES"} ;;
           # e.g. FRAGMENTS_RESOURCES='{"fragsim_fragment_0": 1, "fragsim_fragment_1": 1}'
  serve)   # on the head: discovery on every node, one actor per fragment, the live view, the verdict
    fragsim serve "$RUN_DIR" --ray "$HEAD_IP:6379" --source "$SOURCE" ;;
  resume)  # after a coordinator crash: its actors are still up, found by name, not started twice
    fragsim resume "$RUN_DIR" --ray "$HEAD_IP:6379" --source "$SOURCE" ;;
  *) echo "usage: $0 plan|head|worker|serve|resume" >&2; exit 2 ;;
esac
