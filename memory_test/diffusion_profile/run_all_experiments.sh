#!/usr/bin/env bash
# Sweep DiT DP-SGD profiling configurations, one fresh process per configuration, resumable; then plot.
#
#   bash memory_test/diffusion_profile/run_all_experiments.sh                      # everything, default sizes
#   bash run_all_experiments.sh --experiments vanilla,ghost --batch-sizes 8,32,64 --precisions fp32,bf16
#   bash run_all_experiments.sh --batch-size 4 --num-iter 10 --no-flash-attention  # flags of the original script
#   bash run_all_experiments.sh --nproc-per-node 2 --batch-sizes 8,16   # FSDP2 on 2 GPUs: sharded DP modes + vanilla
#
# Run with --help for every option. The plan (which configurations, each one's record and command line) comes from
# Python (memory_test.diffusion_profile.suite.plan), which checks every flag with single_experiment.py's own checks
# before anything runs. This script holds what must outlive a configuration: the folder lock, the loop, Ctrl-C.
# Rerunning the same command resumes: finished records (ok, oom, skipped) are kept, error records are retried.
# Ctrl-C stops the running configuration and leaves no partial file. One sweep per output folder at a time (a lock
# the kernel drops with the sweep); each configuration dies with the sweep.

set -uo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -z "${VIRTUAL_ENV:-}" && -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY="$(command -v python || command -v python3)"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUITE=memory_test.diffusion_profile.suite

for arg in "$@"; do
    [[ "$arg" == -h || "$arg" == --help ]] && exec "$PY" -m "$SUITE.plan" --help
done
# The plan, as bash assignments: OUT_DIR, PLOTS, DRY_RUN, USE_BRACKET, TOTAL, INFO (lines to print) and per
# configuration C_LABEL, C_BATCH (a batch or "max"), C_OUT (its record), C_ARGS (single_experiment's command line).
# Bad input: one line, exit 2.
PLAN="$("$PY" -m "$SUITE.plan" --emit-bash "$@")" || exit 2
eval "$PLAN"

# One line, "<what> — <what to do>", exit 2 (bad input: nothing has run).
die() { echo "run_all_experiments.sh: error: $1 — ${2:-see run_all_experiments.sh --help}" >&2; exit 2; }
mkdir -p "$OUT_DIR" || die "cannot create --output-dir $OUT_DIR" "choose a folder you can write"
[[ -w "$OUT_DIR" ]] || die "--output-dir $OUT_DIR is not writable" "choose a folder you can write"

# ----- one sweep per folder ------------------------------------------------------------------------------------
# flock on the folder itself, so no lock file can go stale: this shell keeps the descriptor, the configurations it
# starts inherit it, and the kernel drops the lock when the last of them exits (also after kill -9). The holder's
# PID goes to .sweep.pid (memory_test.cli_common.folder_lock) for the message that refuses a second sweep. The
# configurations find the descriptor in MEMORY_TEST_SWEEP_LOCK_FD and write through the lock; single_experiment run
# by hand into this folder is refused meanwhile.
HOLDS_LOCK=0
if [[ $DRY_RUN -eq 0 ]]; then
    exec {LOCK_FD}<"$OUT_DIR" || die "cannot open --output-dir $OUT_DIR" "choose a folder you can read"
    "$PY" -m memory_test.cli_common.folder_lock "$LOCK_FD" "$OUT_DIR" "$$" || exit 2
    HOLDS_LOCK=1
    export MEMORY_TEST_SWEEP_LOCK_FD="$LOCK_FD"
fi
LOG="$(mktemp "${TMPDIR:-/tmp}/run_all_experiments.$$.XXXXXX")"  # this sweep's own log of the running configuration
cleanup() {
    rm -f "$LOG"
    if [[ $HOLDS_LOCK -eq 1 && "$(cat "$OUT_DIR/.sweep.pid" 2>/dev/null)" == "$$" ]]; then rm -f "$OUT_DIR/.sweep.pid"; fi
}
trap cleanup EXIT

fmt_s() { local s=$1; printf '%d:%02d:%02d' $((s / 3600)) $((s % 3600 / 60)) $((s % 60)); }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
single_experiment() { "$PY" -m memory_test.diffusion_profile.single_experiment "$@"; }
for line in "${INFO[@]}"; do echo "$line"; done

# ----- Ctrl-C: stop the child, leave no partial file ------------------------------------------------------------
CHILD="" CURRENT=""
on_interrupt() {
    trap - INT TERM
    if [[ -n "$CHILD" ]]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
    # The child removes its own temp files when it unwinds; should it have died harder, remove what the running
    # configuration leaves beside its record (".<record>.*": temp file, probe and rank folders) and nothing else:
    # other files in this folder are not this sweep's.
    [[ -n "$CURRENT" ]] && rm -rf -- "$(dirname "$CURRENT")/.$(basename "$CURRENT")."*
    echo
    echo "Interrupted. Finished records are kept; rerun the same command to resume." >&2
    exit 130
}
trap on_interrupt INT TERM

START=$(date +%s) RAN=0 RAN_MS=0 N_OK=0 N_OOM=0 N_ERR=0 N_SKIP=0 N_KEPT=0
for ((i = 0; i < TOTAL; i++)); do
    n=$((i + 1)) out="${C_OUT[i]}" label="${C_LABEL[i]}"
    eval "args=(${C_ARGS[i]})"
    # kept / skip <oom batch> / run [OK,OOM]: from the records already in the folder (suite/resume.py)
    read -r action detail <<<"$("$PY" -m "$SUITE.resume" "$out" "${C_BATCH[i]}" "$USE_BRACKET")"
    case "$action" in
        kept)
            N_KEPT=$((N_KEPT + 1))
            printf '[%d/%d] %-44s kept (%s, from an earlier run)\n' "$n" "$TOTAL" "$label" "$detail"
            continue ;;
        skip)
            if [[ $DRY_RUN -eq 1 ]]; then printf '[%d/%d] %-44s would be skipped\n' "$n" "$TOTAL" "$label"; continue; fi
            read -r exp prec _ <<<"$label"
            single_experiment "${args[@]}" --record-only skipped \
                --record-message "not run: batch $detail of $exp ($prec) already ran out of memory" 2>/dev/null
            N_SKIP=$((N_SKIP + 1))
            printf '[%d/%d] %-44s skipped (batch %s ran out of memory)\n' "$n" "$TOTAL" "$label" "$detail"
            continue ;;
    esac
    if [[ -n "$detail" ]]; then args+=(--max-batch-bracket "$detail"); label="$label ($detail)"; fi
    if [[ $DRY_RUN -eq 1 ]]; then printf '[%d/%d] %-44s would run -> %s\n' "$n" "$TOTAL" "$label" "$out"; continue; fi
    t0=$(now_ms)
    CURRENT="$out"
    # child_of: the configuration gets SIGTERM if this shell dies, even by kill -9 (no orphan measuring on).
    "$PY" -m memory_test.cli_common.child_of $$ -- \
        "$PY" -m memory_test.diffusion_profile.single_experiment "${args[@]}" >"$LOG" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    CHILD="" CURRENT=""
    dt_ms=$(( $(now_ms) - t0 ))
    RAN=$((RAN + 1))
    RAN_MS=$((RAN_MS + dt_ms))
    case $rc in  # single_experiment's exit codes (suite/exit_codes.py)
        0) N_OK=$((N_OK + 1)); result="ok" ;;
        3) N_OOM=$((N_OOM + 1)); result="OOM" ;;
        *)
            N_ERR=$((N_ERR + 1))
            if [[ "$("$PY" -m memory_test.records status "$out")" == missing ]]; then  # crashed: record it anyway
                msg="single_experiment.py exited with code $rc without a record: $(tail -n 3 "$LOG" | tr '\n' ' ' | cut -c1-600)"
                single_experiment "${args[@]}" --record-only error --record-message "$msg" >/dev/null 2>&1
            fi
            result="ERROR (rc=$rc): $(tail -n 1 "$LOG" | cut -c1-160)" ;;
    esac
    elapsed=$(( $(date +%s) - START ))
    eta=$(( RAN_MS / RAN * (TOTAL - n) / 1000 ))
    printf '[%d/%d] %-44s %s (%d.%ds) | elapsed %s | ETA %s\n' "$n" "$TOTAL" "$label" "$result" $((dt_ms / 1000)) \
        $((dt_ms % 1000 / 100)) "$(fmt_s "$elapsed")" "$(fmt_s "$eta")"
done
trap - INT TERM
[[ $DRY_RUN -eq 1 ]] && exit 0

echo "Done in $(fmt_s $(( $(date +%s) - START ))): $N_OK ok, $N_OOM oom, $N_ERR error, $N_SKIP skipped, $N_KEPT kept."
if [[ $PLOTS -eq 1 ]]; then
    "$PY" "$SCRIPT_DIR/visualize_memory_breakdown.py" --results-dir "$OUT_DIR"
    case $? in  # the visualizer's exit codes: 0 all drawn, 3 drawn without the files it warned about
        0) ;;
        3) echo "note: the visualizer skipped the files named above; the charts show the rest" >&2 ;;
        *) echo "warning: the visualizer failed (see above)" >&2 ;;
    esac
    [[ -f "$OUT_DIR/plots/summary.md" ]] && { echo; cat "$OUT_DIR/plots/summary.md"; }
fi
[[ $N_ERR -eq 0 ]]
