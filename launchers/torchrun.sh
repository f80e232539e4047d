#!/usr/bin/env bash
# Start `python -m dpface train` under torchrun, on one node or many.
#
#   launchers/torchrun.sh [launcher options] -- --config configs/x.yaml [--resume R] [key=value ...]
#
# Everything after `--` goes to `dpface train` unchanged: the config file and its dotted
# overrides are the job's only input. Launcher options (each also read from the
# environment; under SLURM the SLURM_* variables fill in what is not given):
#
#   --nnodes N           DPFACE_NNODES, SLURM_NNODES, else 1
#   --node-rank R        DPFACE_NODE_RANK, NODE_RANK, SLURM_NODEID, else 0
#   --nproc-per-node P   DPFACE_NPROC_PER_NODE, SLURM_GPUS_ON_NODE, else the GPU count (1 on CPU)
#   --rdzv-endpoint H:P  DPFACE_RDZV_ENDPOINT, MASTER_ADDR:MASTER_PORT, else the first host of
#                        SLURM_JOB_NODELIST:29500; needed when nnodes > 1
#   --rdzv-backend B     c10d (default: elastic, survives restarts on any node) or static
#                        (fixed node ranks, MASTER_ADDR/MASTER_PORT style)
#   --rdzv-id ID         DPFACE_RDZV_ID, SLURM_JOB_ID, else "dpface"
#   --max-restarts K     DPFACE_MAX_RESTARTS, else 0: restarts of the whole worker group after a
#                        worker dies; each restart resumes from the latest complete checkpoint
#   --dry-run            print the command instead of running it
#
# `--resume auto` is added unless the training arguments carry their own --resume: a
# restarted group (or a requeued job) must continue from the latest complete checkpoint,
# not start over. A run without checkpoints starts fresh either way; a new run in a run
# directory that holds another run's checkpoints needs its own experiment.name (a resume
# at another global batch or optimizer stops with an error that says so).
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

nnodes="${DPFACE_NNODES:-${SLURM_NNODES:-1}}"
node_rank="${DPFACE_NODE_RANK:-${NODE_RANK:-${SLURM_NODEID:-0}}}"
nproc="${DPFACE_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
endpoint="${DPFACE_RDZV_ENDPOINT:-}"
backend="c10d"
rdzv_id="${DPFACE_RDZV_ID:-${SLURM_JOB_ID:-dpface}}"
max_restarts="${DPFACE_MAX_RESTARTS:-0}"
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes="${2:?--nnodes needs a value}"; shift 2 ;;
    --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
    --nproc-per-node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
    --rdzv-endpoint) endpoint="${2:?--rdzv-endpoint needs a value}"; shift 2 ;;
    --rdzv-backend) backend="${2:?--rdzv-backend needs a value}"; shift 2 ;;
    --rdzv-id) rdzv_id="${2:?--rdzv-id needs a value}"; shift 2 ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown launcher option '$1' (training arguments go after '--')" ;;
  esac
done

train_args=("$@")
has_config=0; has_resume=0
for a in "${train_args[@]}"; do
  [[ "$a" == --config || "$a" == --config=* ]] && has_config=1
  [[ "$a" == --resume || "$a" == --resume=* ]] && has_resume=1
done
[[ $has_config == 1 ]] || die "no --config: usage: $0 [options] -- --config configs/x.yaml [key=value ...]"
[[ $has_resume == 1 ]] || train_args=(--resume auto "${train_args[@]}")

for v in nnodes node_rank max_restarts; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
(( nnodes >= 1 )) || die "nnodes must be >= 1"
(( node_rank < nnodes )) || die "node rank $node_rank is not below nnodes $nnodes"
[[ "$backend" == c10d || "$backend" == static ]] || die "--rdzv-backend must be c10d or static, got '$backend'"

if [[ -z "$nproc" ]]; then
  # One process per GPU; one on a CPU-only node (the CPU run uses its cores through threads).
  nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || nproc=1
fi
nproc="${nproc%%(*}"  # SLURM may write e.g. "4(x2)"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "nproc per node must be a positive integer, got '$nproc'"

if [[ -z "$endpoint" && -n "${MASTER_ADDR:-}" ]]; then
  endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}"
fi
if [[ -z "$endpoint" && -n "${SLURM_JOB_NODELIST:-}" && "$nnodes" -gt 1 ]]; then
  command -v scontrol >/dev/null || die "SLURM_JOB_NODELIST is set but scontrol is missing: pass --rdzv-endpoint HOST:PORT"
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  endpoint="${head_node}:${DPFACE_RDZV_PORT:-29500}"
fi

# With the c10d rendezvous torchrun's agents share one TCP store across restarts, and the
# restarted workers' process group (same key prefix) can read the dead attempt's peer
# addresses from it ("Gloo connectFullMesh failed ... Connection refused" after a restart).
# Without the sharing, rank 0 of each attempt hosts a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

cmd=("${PYTHON:-python}" -m torch.distributed.run --nproc-per-node "$nproc" --max-restarts "$max_restarts")
if [[ "$nnodes" -eq 1 && -z "$endpoint" ]]; then
  # One node: a private rendezvous on a free local port (no port clashes between jobs).
  cmd+=(--standalone)
else
  [[ -n "$endpoint" ]] || die "nnodes=$nnodes needs a rendezvous endpoint: --rdzv-endpoint HOST:PORT (the head node), MASTER_ADDR/MASTER_PORT, or run under SLURM"
  [[ "$endpoint" == *:* ]] || endpoint="${endpoint}:29500"
  if [[ "$backend" == static ]]; then
    cmd+=(--nnodes "$nnodes" --node-rank "$node_rank" --master-addr "${endpoint%:*}" --master-port "${endpoint##*:}")
  else
    # c10d: the agents agree on node ranks themselves; node_rank only names this node in logs.
    cmd+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id")
  fi
fi
cmd+=(-m dpface train "${train_args[@]}")

echo "torchrun.sh: node $node_rank of $nnodes, $nproc process(es) per node, max restarts $max_restarts" >&2
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# Not exec: on SIGTERM/SIGINT (SLURM, Ctrl-C) forward it, let every rank write its checkpoint,
# and exit 143/130 like the ranks do (torchrun itself exits 1 with a traceback).
got=""
trap 'got=143; kill -TERM "$child" 2>/dev/null || true' TERM
trap 'got=130; kill -INT "$child" 2>/dev/null || true' INT
"${cmd[@]}" &
child=$!
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
[[ -n "$got" ]] && exit "$got"
exit "$rc"
