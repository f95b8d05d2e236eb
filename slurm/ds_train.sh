#!/bin/bash
# Train ds_gpt on a SLURM cluster. Submit from the repository root:
#
#   sbatch --account=def-you slurm/ds_train.sh                      # mode A: deepspeed launcher
#   DS_GPT_LAUNCH=srun sbatch --account=def-you slurm/ds_train.sh   # mode B: one srun task per GPU
#   sbatch slurm/ds_train.sh --max_iters 2000 --eval_interval 200   # extra args go to train.py
#
# The #SBATCH defaults are the reference run's Narval allocation (2 nodes x 4 A100, 8 cpus per task, the whole
# node's memory, 5 days); any `sbatch --option` overrides them. Variables (export them, or put
# them in front of sbatch; sbatch passes the environment on):
#   DS_GPT_LAUNCH  deepspeed (default) | srun
#   VENV           virtual environment to activate              (default: ./.venv)
#   MODULES        `module load` list, e.g. "gcc arrow python"  (default: none)
#   DATA_DIR       directory with train.bin/val.bin             (default: data/openwebtext)
#   OUT_DIR        run directory; a requeued or resubmitted job resumes from its newest
#                  checkpoint                                   (default: out/gpt2-124m)
#   TRAIN_CONFIG   training options, TOML; empty: the trainer's defaults
#                                                               (default: config/train_gpt2.toml)
#   DS_CONFIG      DeepSpeed JSON config                        (default: ds_configs/zero1.json)
#   MASTER_PORT    rendezvous port                              (default: derived from the job id)
#   MAX_REQUEUES   stop requeueing after this many restarts     (default: 20)
#   DS_GPT_CACHE   JIT-built ops, tokenizer files               (default: ./.cache)
#   DS_GPT_PREFLIGHT  1 checks before the launch, 0 skips that, only: check and end the job
#                  without training                             (default: 1; see docs/slurm.md)
#   STAGE_DATA     1: copy the data to node-local storage on every node and train from there
#   STAGE_DIR      node-local directory for STAGE_DATA=1        (default: $SLURM_TMPDIR)
#
# Before the launch, `python -m ds_gpt.preflight` checks the hostfile against the allocation,
# ssh, the environment the ranks get, the master port, the data and out_dir from every node and
# one all-reduce; it writes OUT_DIR/preflight.json, and on any failure the job exits 2 without
# training. This job's hostfile and env file live in a private directory (mode 700) that goes
# when the job ends.
#
# Preemption and time limits: SLURM sends USR1 to this script 120 s before the limit (a
# pre-empted job's limit moves to now + GraceTime, so this warning comes then too). The script
# forwards it to the ranks (srun: every task; deepspeed launcher: the first node's ranks, which
# share the stop with all others); the ranks checkpoint at the next step boundary and exit with
# 75 (ds_gpt.errors.EXIT_REQUEUE); the script then runs `scontrol requeue`, and the requeued job
# starts with --init_from auto, i.e. from that checkpoint. SIGTERM to the job's steps (what
# pre-emption sends first, or `scancel --signal=TERM`) reaches srun's tasks directly, with the same
# effect. SIGTERM to the whole job (`scancel`, `scancel --full`) is forwarded the same way, but
# the job is not requeued: it was cancelled. In mode A the launcher is shielded from SIGTERM
# (ds_gpt.signal_shield) so that the ranks live to checkpoint.
#
#SBATCH --job-name=ds_gpt
#SBATCH --nodes=2
#SBATCH --gpus-per-node=a100:4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=5-0
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

# -----------------------------------------------------------------------------
# environment
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f ds_gpt/train.py ]]; then
    echo "ds_train.sh: submit from the ds_gpt repository root (no ds_gpt/train.py in $PWD)" >&2
    exit 2
fi
ROOT=$PWD
DS_GPT_LAUNCH=${DS_GPT_LAUNCH:-deepspeed}
VENV=${VENV:-$ROOT/.venv}
DATA_DIR=${DATA_DIR:-data/openwebtext}
OUT_DIR=${OUT_DIR:-out/gpt2-124m}
TRAIN_CONFIG=${TRAIN_CONFIG-config/train_gpt2.toml}  # the recommended 124M run (README), with DS_CONFIG's JSON
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
MAX_REQUEUES=${MAX_REQUEUES:-20}
if [[ -n ${MODULES:-} ]]; then
    module load $MODULES  # word splitting wanted: a list of modules
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export DS_GPT_CACHE=${DS_GPT_CACHE:-$ROOT/.cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DS_GPT_CACHE/torch_extensions}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$DS_GPT_CACHE/tiktoken}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Since SLURM 22.05, srun no longer inherits --cpus-per-task from sbatch.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

EXIT_REQUEUE=$(python -c 'from ds_gpt.errors import EXIT_REQUEUE; print(EXIT_REQUEUE)')
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$(python -c 'import os; from ds_gpt.launch_env import slurm_port; print(slurm_port(os.environ))')}
if [[ ! $MASTER_PORT =~ ^[0-9]{1,5}$ ]]; then  # it goes into command lines run on the nodes
    echo "ds_train.sh: MASTER_PORT=$MASTER_PORT is not a port number" >&2
    exit 2
fi
export MASTER_PORT  # mode B's ranks take it as they find it, so the preflight checks the port they use
echo "ds_train.sh: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} mode ${DS_GPT_LAUNCH}" \
     "nodes ${SLURM_JOB_NODELIST} master ${MASTER_ADDR}:${MASTER_PORT} out ${OUT_DIR} at $(date -Is)"

# -----------------------------------------------------------------------------
# this job's files: hostfile and env file, readable by the owner only, gone when the job ends
JOB_DIR=$(umask 077 && mktemp -d "${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/ds_gpt-job$SLURM_JOB_ID.XXXXXX")
trap 'rm -rf "$JOB_DIR"' EXIT
if [[ $DS_GPT_LAUNCH == deepspeed ]]; then
    HOSTFILE=$JOB_DIR/hostfile
    python -m ds_gpt.hostfile --out "$HOSTFILE"
    HOSTS=$(awk '{print $1}' "$HOSTFILE" | paste -sd, -)
    echo "ds_train.sh: hostfile: $(paste -sd, "$HOSTFILE")"
    # Ranks started over ssh do not inherit this environment: deepspeed exports what the
    # file named by DS_ENV_FILE lists (a per-job file, so no one's ~/.deepspeed_env is touched).
    # It is created owner-only (it may carry tokens), once every value it and the launcher export
    # is known to reach the nodes unchanged: the remote shell would expand some (ds_gpt.remote_shell).
    export DS_ENV_FILE=$JOB_DIR/deepspeed_env
    python -m ds_gpt.remote_shell env_file --out "$DS_ENV_FILE" || exit 2
elif [[ $DS_GPT_LAUNCH != srun ]]; then
    echo "ds_train.sh: DS_GPT_LAUNCH=$DS_GPT_LAUNCH; expected deepspeed or srun" >&2
    exit 2
fi
TRAIN_ARGS=(--deepspeed_config "$DS_CONFIG" --data_dir "$DATA_DIR" --out_dir "$OUT_DIR" --init_from auto "$@")
if [[ -n $TRAIN_CONFIG ]]; then TRAIN_ARGS=(--config "$TRAIN_CONFIG" "${TRAIN_ARGS[@]}"); fi  # a later --config wins

# -----------------------------------------------------------------------------
# preflight: every node, the data, out_dir and one all-reduce, before any GPU-hour is spent
if [[ ${DS_GPT_PREFLIGHT:-1} != 0 ]]; then
    PREFLIGHT=(python -m ds_gpt.preflight --launcher "$DS_GPT_LAUNCH" --master_port "$MASTER_PORT"
               --json "$OUT_DIR/preflight.json")
    if [[ $DS_GPT_LAUNCH == deepspeed ]]; then PREFLIGHT+=(--hostfile "$HOSTFILE"); fi
    if ! "${PREFLIGHT[@]}" -- "${TRAIN_ARGS[@]}"; then
        echo "ds_train.sh: preflight failed (the lines above say why); not starting training" \
             "(DS_GPT_PREFLIGHT=0 skips the checks)"
        exit 2
    fi
    if [[ ${DS_GPT_PREFLIGHT:-1} == only ]]; then
        echo "ds_train.sh: preflight passed; DS_GPT_PREFLIGHT=only: not training"
        exit 0
    fi
fi

# -----------------------------------------------------------------------------
# node-local data: every node copies and verifies the data, and the ranks read their copy
if [[ ${STAGE_DATA:-0} == 1 ]]; then
    STAGE_BASE=${STAGE_DIR:-${SLURM_TMPDIR:-}}
    if [[ -z $STAGE_BASE ]]; then
        echo "ds_train.sh: STAGE_DATA=1 needs node-local storage: set STAGE_DIR (SLURM_TMPDIR is unset here)" >&2
        exit 2
    fi
    STAGED=$STAGE_BASE/ds_gpt-$(basename "$DATA_DIR")
    if ! srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
            python -m ds_gpt.stage --src "$(realpath "$DATA_DIR")" --dst "$STAGED"; then
        echo "ds_train.sh: staging the data to $STAGED failed; not starting training"
        exit 2
    fi
    TRAIN_ARGS+=(--data_dir "$STAGED")  # the last --data_dir wins
fi

# -----------------------------------------------------------------------------
# launch, in the background so that this shell can catch SLURM's warning signal
case "$DS_GPT_LAUNCH" in
deepspeed)
    # Mode A: one deepspeed launcher here; it starts `slots` ranks per node through pdsh/ssh.
    # SIGTERM to the whole job (scancel) reaches this launcher and its pdsh/ssh too, and the
    # launcher's own handler would kill the ranks before they checkpoint.
    # The shield blocks SIGTERM for the launcher and its transport; forward_signal below asks the
    # ranks to checkpoint and exit 75 instead.
    # DeepSpeed's pdsh runner puts the arguments, unquoted, into a shell's command line on every
    # node: they travel as one word that no shell reads, and `remote_shell launch` (deepspeed's
    # runner, in-process) refuses anything else on that line that a shell would change.
    PACKED=$(python -m ds_gpt.remote_shell pack -- "${TRAIN_ARGS[@]}")
    python -m ds_gpt.signal_shield python -m ds_gpt.remote_shell launch --hostfile "$HOSTFILE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --no_local_rank --module ds_gpt.remote_shell train "$PACKED" &
    ;;
srun)
    # Mode B: SLURM starts one task per GPU; ds_gpt.launch_env maps SLURM_* to torch's variables.
    srun python -u ds_gpt/train.py "${TRAIN_ARGS[@]}" &
    ;;
esac
LAUNCH_PID=$!

# -----------------------------------------------------------------------------
# preemption: pass the warning signal to the ranks; they checkpoint together and exit 75
CAUGHT=
forward_signal() {
    CAUGHT=$1
    echo "ds_train.sh: caught SIG$1 at $(date -Is); asking the ranks to checkpoint and exit"
    if [[ $DS_GPT_LAUNCH == srun ]]; then
        kill -USR1 "$LAUNCH_PID" 2>/dev/null || true  # srun relays USR1 to every task at once
    else
        # One signalled rank is enough: the trainer shares the stop through its step's
        # all-reduce. So signal the first node's ranks, all at once, and no rank elsewhere:
        # a rank that got its USR1 late, while already exiting with 75, would die of it.
        # They are the children of this job's deepspeed.launcher.launch there (node rank 0,
        # this master port); the launcher itself must not get USR1, it would die.
        local launch="^[^ ]*python[0-9.]* -u -m deepspeed[.]launcher[.]launch .*--node_rank=0 "
        launch+="--master_addr=[^ ]* --master_port=$MASTER_PORT( |\$)"
        PDSH_RCMD_TYPE=ssh pdsh -S -w "${HOSTS%%,*}" \
            "p=\$(pgrep -d, -f '$launch'); [ -z \"\$p\" ] || pkill -USR1 -P \"\$p\"" || true
    fi
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

rc=0
while :; do
    rc=0
    wait "$LAUNCH_PID" || rc=$?
    # `wait` also returns (with 128+signal) when a trapped signal arrives: keep waiting.
    if ((rc > 128)) && kill -0 "$LAUNCH_PID" 2>/dev/null; then continue; fi
    break
done
echo "ds_train.sh: trainer exited with $rc at $(date -Is)"

if ((rc == EXIT_REQUEUE)); then
    if [[ $CAUGHT == TERM ]]; then
        # SIGTERM reaches this script only when the whole job is signalled: `scancel` (a cancel,
        # which `scontrol requeue` would undo) or `scancel --full`. Pre-emption signals the steps
        # only, and SLURM requeues pre-empted jobs itself where the partition says so.
        echo "ds_train.sh: stopped by SIGTERM (scancel): checkpoint saved; not requeueing"
        exit "$rc"
    fi
    if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
        echo "ds_train.sh: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$MAX_REQUEUES); not requeueing"
        exit "$rc"
    fi
    echo "ds_train.sh: checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
