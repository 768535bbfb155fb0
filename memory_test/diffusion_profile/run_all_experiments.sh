#!/usr/bin/env bash
# Sweep DiT DP-SGD profiling configurations, one fresh process per configuration, resumable; then plot.
#
#   bash memory_test/diffusion_profile/run_all_experiments.sh                      # everything, default sizes
#   bash run_all_experiments.sh --experiments vanilla,ghost --batch-sizes 8,32,64 --precisions fp32,bf16
#   bash run_all_experiments.sh --batch-size 4 --num-iter 10 --no-flash-attention  # flags of the original script
#   bash run_all_experiments.sh --nproc-per-node 2 --batch-sizes 8,16   # FSDP2 on 2 GPUs: sharded DP modes + vanilla
#
# Run with --help for every option. Rerunning the same command resumes: finished records (ok, oom, skipped) are
# kept, error records are retried. Ctrl-C stops the running configuration and leaves no partial file. One sweep
# per output folder at a time (a lock the kernel drops with the sweep); each configuration dies with the sweep.

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

usage() {
    cat <<'EOF'
Usage: run_all_experiments.sh [options]

Runs every (experiment x batch size x precision) configuration with single_experiment.py, each in a fresh process,
writing one JSON record per configuration into --output-dir; then draws the charts and prints summary.md.

Selection
  --experiments a,b,c       experiments to run (default: every single-GPU experiment of the registry; with
                            --nproc-per-node N > 1: the sharded DP modes and the vanilla FSDP2 baseline)
  --batch-sizes 8,32,64     batch sizes, per GPU (default: 8,32,64 on a GPU; 2,4 on CPU)
  --batch-size N            one batch size (same as --batch-sizes N)
  --precisions fp32,bf16    precisions (default: fp32); --precision P is the same for one
  --find-max-batch          also search the largest batch of each experiment and precision
  --max-batch-only          only the max-batch searches, no batch-size grid
  --max-batch-limit N       stop the search there (default: single_experiment's, 65536 GPU / 64 CPU)
  --max-batch-resolution N  stop bisecting at this gap (default 1)
  --max-batch-start N       first batch of the doubling (default 1)
  --no-max-batch-bracket    always double from the start; by default a search whose grid records already hold a
                            batch that ran and a larger one that ran out of memory only bisects between the two
Model and run
  --model NAME              DiT preset, e.g. DiT-XL/2, DiT-B/2, DiT-tiny (default: DiT-XL/2 on GPU, DiT-tiny on CPU)
  --image-size N            image side in pixels (default: the model's, 256 for DiT-XL/2)
  --patch-size N            patch size (default: the model's)
  --in-channels N           latent channels (4)
  --num-classes N           classes (default: the model's)
  --num-iter N              measured steps per configuration (default 10 GPU, 3 CPU)
  --warmup-iter N           warm-up steps (default 3 GPU, 1 CPU)
  --noise-multiplicity K    noise draws per image (default 1)
  --noise-multiplier S      σ (default 1.0)     --max-grad-norm C   (default 1.0)
  --optimizer NAME          adamw | adam | sgd  --seed N
  --use-flash-attention / --no-flash-attention
  --device DEV              auto | cuda | cuda:N | cpu (default auto)
  --nproc-per-node N        processes (GPUs) per run: N > 1 runs each configuration under torchrun with FSDP2
                            (single_experiment.py starts it); global batch = N x batch size
Output
  --output-dir DIR          records, charts and summary.md (default: results/diffusion_profile)
  --no-plots                skip the visualizer at the end
  --dry-run                 list the configurations and whether they would run, then stop
  -h, --help                this help

Each record is named <experiment>__<model>__img<size>__bs<B>__<precision>__k<K>__<fa|nofa>[__w<N>].json (bsmax
for a max-batch search; __w<N> only when N > 1). Larger batches of an experiment that ran out of memory are recorded as "skipped".

Every flag is checked before anything runs (the values passed on to single_experiment.py by its own checks); bad
input ends with one line "run_all_experiments.sh: error: <what> — <what to do>" and exit code 2. A second sweep
into a folder that a running sweep holds is refused the same way, naming the holder's PID. Exit codes: 0 every
configuration ran (ok, oom or skipped), 1 some ended in error, 2 bad input or folder in use, 130 interrupted.
MEMORY_TEST_DEBUG=1 shows tracebacks.
EOF
}

# One line, "<what> — <what to do>", exit 2 (bad input: nothing has run).
die() { echo "run_all_experiments.sh: error: $1 — ${2:-see run_all_experiments.sh --help}" >&2; exit 2; }

EXPERIMENTS="" BATCH_SIZES="" PRECISIONS="fp32" MODEL="" IMAGE_SIZE="" PATCH_SIZE="" IN_CHANNELS="4"
NUM_CLASSES="" NUM_ITER="" WARMUP_ITER="" NOISE_K="1" SIGMA="" CLIP="" OPTIMIZER="" SEED="" FLASH="--use-flash-attention"
DEVICE="auto" NPROC="1" OUT_DIR="$REPO_ROOT/results/diffusion_profile" FIND_MAX=0 MAX_ONLY=0 MAX_LIMIT=""
MAX_RES="" MAX_START="" USE_BRACKET=1 PLOTS=1 DRY_RUN=0

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --experiments|--experiment) need "$@"; EXPERIMENTS="$2"; shift 2 ;;
        --batch-sizes|--batch-size) need "$@"; BATCH_SIZES="$2"; shift 2 ;;
        --precisions|--precision) need "$@"; PRECISIONS="$2"; shift 2 ;;
        --model) need "$@"; MODEL="$2"; shift 2 ;;
        --image-size) need "$@"; IMAGE_SIZE="$2"; shift 2 ;;
        --patch-size) need "$@"; PATCH_SIZE="$2"; shift 2 ;;
        --in-channels) need "$@"; IN_CHANNELS="$2"; shift 2 ;;
        --num-classes) need "$@"; NUM_CLASSES="$2"; shift 2 ;;
        --num-iter) need "$@"; NUM_ITER="$2"; shift 2 ;;
        --warmup-iter) need "$@"; WARMUP_ITER="$2"; shift 2 ;;
        --noise-multiplicity) need "$@"; NOISE_K="$2"; shift 2 ;;
        --noise-multiplier) need "$@"; SIGMA="$2"; shift 2 ;;
        --max-grad-norm) need "$@"; CLIP="$2"; shift 2 ;;
        --optimizer) need "$@"; OPTIMIZER="$2"; shift 2 ;;
        --seed) need "$@"; SEED="$2"; shift 2 ;;
        --use-flash-attention) FLASH="--use-flash-attention"; shift ;;
        --no-flash-attention) FLASH="--no-flash-attention"; shift ;;
        --device) need "$@"; DEVICE="$2"; shift 2 ;;
        --nproc-per-node) need "$@"; NPROC="$2"; shift 2 ;;
        --output-dir) need "$@"; OUT_DIR="$2"; shift 2 ;;
        --find-max-batch) FIND_MAX=1; shift ;;
        --max-batch-only) FIND_MAX=1; MAX_ONLY=1; shift ;;
        --max-batch-limit) need "$@"; MAX_LIMIT="$2"; shift 2 ;;
        --max-batch-resolution) need "$@"; MAX_RES="$2"; shift 2 ;;
        --max-batch-start) need "$@"; MAX_START="$2"; shift 2 ;;
        --no-max-batch-bracket) USE_BRACKET=0; shift ;;
        --no-plots) PLOTS=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) die "unknown option $1" ;;
    esac
done

is_posint() { [[ "$1" =~ ^[0-9]+$ && "$1" -gt 0 ]]; }
for v in ${BATCH_SIZES//,/ }; do
    is_posint "$v" || die "batch sizes must be positive integers, got '$v'" "e.g. --batch-sizes 8,32,64"
done
[[ -z "$BATCH_SIZES" || -n "${BATCH_SIZES//,/}" ]] || die "--batch-sizes '$BATCH_SIZES' names no batch size" \
    "e.g. --batch-sizes 8,32,64"
for v in "$NUM_ITER" "$MAX_LIMIT" "$MAX_RES" "$MAX_START" "$NOISE_K" "$NPROC"; do
    [[ -z "$v" ]] || is_posint "$v" || die "expected a positive integer, got '$v'"
done
[[ -z "$WARMUP_ITER" || "$WARMUP_ITER" =~ ^[0-9]+$ ]] || die "--warmup-iter must be >= 0, got '$WARMUP_ITER'"
for p in ${PRECISIONS//,/ }; do
    [[ "$p" == fp32 || "$p" == bf16 ]] || die "precision must be fp32 or bf16, got '$p'" "e.g. --precisions fp32,bf16"
done
[[ -n "${PRECISIONS//,/}" ]] || die "--precisions '$PRECISIONS' names no precision" "e.g. --precisions fp32,bf16"
[[ -e "$OUT_DIR" && ! -d "$OUT_DIR" ]] && die "--output-dir $OUT_DIR is a file, not a folder" "choose a folder"

# ----- device and defaults ---------------------------------------------------------------------------------------
HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1; then  # torch decides; without nvidia-smi there is no GPU to find
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAS_GPU=1
fi
if [[ "$DEVICE" == cuda* && $HAS_GPU -eq 0 ]]; then
    die "--device $DEVICE requested but no CUDA GPU is available" "use --device cpu (or auto)"
fi
if [[ $HAS_GPU -eq 1 && "$DEVICE" != cpu ]]; then
    ON_GPU=1
    MODEL="${MODEL:-DiT-XL/2}" BATCH_SIZES="${BATCH_SIZES:-8,32,64}" NUM_ITER="${NUM_ITER:-10}" WARMUP_ITER="${WARMUP_ITER:-3}"
else
    ON_GPU=0
    [[ "$DEVICE" == auto ]] && DEVICE=cpu
    if [[ -z "$MODEL" ]]; then
        echo "No CUDA GPU: running the default sweep on CPU with the tiny model DiT-tiny (CPU numbers are not GPU numbers)."
        MODEL="DiT-tiny"
    fi
    BATCH_SIZES="${BATCH_SIZES:-2,4}" NUM_ITER="${NUM_ITER:-3}" WARMUP_ITER="${WARMUP_ITER:-1}"
fi

# Values passed on to every single_experiment.py run; checked below by its own parser and validation.
PASS=(--in-channels "$IN_CHANNELS" --device "$DEVICE" --num-iter "$NUM_ITER" --warmup-iter "$WARMUP_ITER"
      --noise-multiplicity "$NOISE_K" "$FLASH" --nproc-per-node "$NPROC")
[[ -n "$NUM_CLASSES" ]] && PASS+=(--num-classes "$NUM_CLASSES")
[[ -n "$SIGMA" ]] && PASS+=(--noise-multiplier "$SIGMA")
[[ -n "$CLIP" ]] && PASS+=(--max-grad-norm "$CLIP")
[[ -n "$OPTIMIZER" ]] && PASS+=(--optimizer "$OPTIMIZER")
[[ -n "$SEED" ]] && PASS+=(--seed "$SEED")
MAXARGS=(--find-max-batch)
[[ -n "$MAX_LIMIT" ]] && MAXARGS+=(--max-batch-limit "$MAX_LIMIT")
[[ -n "$MAX_RES" ]] && MAXARGS+=(--max-batch-resolution "$MAX_RES")
[[ -n "$MAX_START" ]] && MAXARGS+=(--max-batch-start "$MAX_START")
FIRST_BS="$(echo "${BATCH_SIZES//,/ }" | tr ' ' '\n' | sort -n | head -n 1)"

# Effective model name, image size and experiment list, from the same code single_experiment.py uses; then every
# configuration's flags through single_experiment.py's own checks, so that nothing starts with a value it refuses.
RESOLVED="$("$PY" - "$MODEL" "${PATCH_SIZE:-0}" "${IMAGE_SIZE:-0}" "$EXPERIMENTS" "$NOISE_K" "$NPROC" "$ON_GPU" \
    "$OUT_DIR" "$FIRST_BS" "$FIND_MAX" "${PASS[@]}" -- "${MAXARGS[@]}" <<'PYEOF'
import argparse
import sys
from pathlib import Path

import torch

from memory_test.cli_common.errors import ToolError, run_tool
from memory_test.diffusion_profile import distributed_launch as dl
from memory_test.models.dit_presets import build_dit_config
from memory_test.diffusion_profile.experiments import EXPERIMENTS, experiment_names, resolve_experiment
from memory_test.diffusion_profile.experiments import single_device_experiments
from memory_test.diffusion_profile.run_config import UsageError, build_parser, model_for_run, validate

model, patch, img, exps = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]) or None, sys.argv[4]
k, nproc, on_gpu, out_dir, first_bs = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1", sys.argv[8], sys.argv[9]
find_max, rest = sys.argv[10] == "1", sys.argv[11:]
passthrough, maxargs = rest[: rest.index("--")], rest[rest.index("--") + 1 :]


def experiments() -> list[str]:
    if exps:
        names = [resolve_experiment(e.strip()).name for e in exps.split(",") if e.strip()]
        if not names:
            raise ToolError(f"--experiments {exps!r} names no experiment", "e.g. --experiments vanilla,ghost")
    elif nproc > 1:
        names = [*dl.FSDP_BASELINES, *dl.sharded_experiments()]
    else:
        names = single_device_experiments()
    names = list(dict.fromkeys(names))
    for n in names:
        dl.check_request(EXPERIMENTS[n], nproc)
    if on_gpu and nproc > torch.cuda.device_count():
        raise ToolError(f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} GPU(s) visible")
    no_k = [n for n in names if k > 1 and not EXPERIMENTS[n].supports_noise_multiplicity]
    if no_k and exps:
        raise ToolError(f"{', '.join(no_k)} (upstream Opacus) cannot group K > 1 noise draws per image",
                        "leave them out of --experiments, or use --noise-multiplicity 1")
    if no_k:
        print(f"note: K > 1: leaving out {', '.join(no_k)} (upstream Opacus treats every row as a sample)",
              file=sys.stderr)
    return [n for n in names if n not in no_k]


def check_flags(name: str, image_size: int, names: list[str]) -> None:
    """single_experiment.py's parser and validation on each experiment's flags (nothing is written)."""
    parser = build_parser(experiment_names(), exit_on_error=False)
    probe = str(Path(out_dir) / "sweep_flag_check.json")
    for n in names:
        argv = ["--experiment", n, "--model", name, "--image-size", str(image_size), "--output", probe, *passthrough]
        for extra in (["--batch-size", first_bs], [*maxargs, "--batch-size", "1"] if find_max else None):
            if extra is None:
                continue
            try:
                validate(parser.parse_args(argv + extra))
            except (UsageError, argparse.ArgumentError) as e:
                raise ToolError(str(e), "fix that flag (the sweep passes it to single_experiment.py)") from None


def resolve() -> int:
    name, _ = model_for_run(model, patch, torch.device("cpu"))
    image_size = build_dit_config(name, img)["sample_size"] * 8
    names = experiments()
    check_flags(name, image_size, names)
    print(name, image_size, ",".join(names))
    return 0


sys.exit(run_tool("run_all_experiments.sh", resolve, bad_input=(UsageError, ValueError)))
PYEOF
)" || exit 2
read -r MODEL IMAGE_SIZE EXPERIMENTS <<<"$RESOLVED"
MODEL_SLUG="$(echo "$MODEL" | tr '/' '-' | tr -c 'A-Za-z0-9.\n-' '_')"
FA_TAG=$([[ "$FLASH" == "--use-flash-attention" ]] && echo fa || echo nofa)
mkdir -p "$OUT_DIR" || die "cannot create --output-dir $OUT_DIR" "choose a folder you can write"
[[ -w "$OUT_DIR" ]] || die "--output-dir $OUT_DIR is not writable" "choose a folder you can write"

# ----- one sweep per folder ------------------------------------------------------------------------------------
# flock on the folder itself, so no lock file can go stale: this shell keeps the descriptor, the configurations it
# starts inherit it, and the kernel drops the lock when the last of them exits (also after kill -9). The holder's
# PID goes to .sweep.pid (memory_test.cli_common.folder_lock) for the message that refuses a second sweep.
HOLDS_LOCK=0
if [[ $DRY_RUN -eq 0 ]]; then
    exec {LOCK_FD}<"$OUT_DIR" || die "cannot open --output-dir $OUT_DIR" "choose a folder you can read"
    "$PY" -m memory_test.cli_common.folder_lock "$LOCK_FD" "$OUT_DIR" "$$" || exit 2
    HOLDS_LOCK=1
fi
LOG="$(mktemp "${TMPDIR:-/tmp}/run_all_experiments.$$.XXXXXX")"  # this sweep's own log of the running configuration
cleanup() {
    rm -f "$LOG"
    if [[ $HOLDS_LOCK -eq 1 && "$(cat "$OUT_DIR/.sweep.pid" 2>/dev/null)" == "$$" ]]; then rm -f "$OUT_DIR/.sweep.pid"; fi
}
trap cleanup EXIT

COMMON=(--model "$MODEL" --image-size "$IMAGE_SIZE" "${PASS[@]}")
W_TAG=""; [[ "$NPROC" -gt 1 ]] && W_TAG="__w$NPROC"

# ----- the plan: one line per configuration: experiment precision batch(or "max") -------------------------------
SORTED_BS="$(echo "${BATCH_SIZES//,/ }" | tr ' ' '\n' | sort -n | uniq | tr '\n' ' ')"
PLAN=()
for exp in ${EXPERIMENTS//,/ }; do
    for prec in ${PRECISIONS//,/ }; do
        if [[ $MAX_ONLY -eq 0 ]]; then for bs in $SORTED_BS; do PLAN+=("$exp $prec $bs"); done; fi
        [[ $FIND_MAX -eq 1 ]] && PLAN+=("$exp $prec max")
    done
done
TOTAL=${#PLAN[@]}
[[ $TOTAL -gt 0 ]] || die "the options select no configuration to run" "check --experiments, --batch-sizes, --precisions"

record_path() {  # experiment precision batch|max
    local b="bs$3"; [[ "$3" == max ]] && b="bsmax"
    echo "$OUT_DIR/${1}__${MODEL_SLUG}__img${IMAGE_SIZE}__${b}__${2}__k${NOISE_K}__${FA_TAG}${W_TAG}.json"
}
grid_bracket() {  # experiment precision -> "OK,OOM" from this folder's grid records, or nothing
    local ok=0 oom=0 f st b
    local files=("$OUT_DIR/${1}__${MODEL_SLUG}__img${IMAGE_SIZE}__bs"[0-9]*"__${2}__k${NOISE_K}__${FA_TAG}${W_TAG}.json")
    [[ -e "${files[0]}" ]] || return 0
    while read -r f st; do
        b="${f##*__bs}"; b="${b%%__*}"
        [[ "$st" == ok && $b -gt $ok ]] && ok=$b
        [[ "$st" == oom && ( $oom -eq 0 || $b -lt $oom ) ]] && oom=$b
    done < <(paste -d' ' <(printf '%s\n' "${files[@]}") <("$PY" -m memory_test.profiling.records status "${files[@]}"))
    [[ $ok -gt 0 && $oom -gt $ok ]] && echo "$ok,$oom"
    return 0
}
record_status() { "$PY" -m memory_test.profiling.records status "$1" 2>/dev/null || echo invalid; }
fmt_s() { local s=$1; printf '%d:%02d:%02d' $((s / 3600)) $((s % 3600 / 60)) $((s % 60)); }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

echo "Sweep: $TOTAL configuration(s) | model $MODEL img $IMAGE_SIZE | device $DEVICE | experiments $EXPERIMENTS"
echo "       batch sizes ${SORTED_BS% } | precisions $PRECISIONS | K=$NOISE_K | $FA_TAG | processes $NPROC | records in $OUT_DIR"

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

declare -A OOM_AT=()  # "experiment precision" -> smallest batch that ran out of memory
START=$(date +%s) RAN=0 RAN_MS=0 N_OK=0 N_OOM=0 N_ERR=0 N_SKIP=0 N_KEPT=0
i=0
for item in "${PLAN[@]}"; do
    i=$((i + 1))
    read -r exp prec bs <<<"$item"
    out="$(record_path "$exp" "$prec" "$bs")"
    key="$exp $prec"
    status="$(record_status "$out")"
    label="$exp $prec bs=$bs"
    [[ "$bs" == max ]] && label="$exp $prec find-max-batch"
    if [[ "$status" == ok || "$status" == oom || "$status" == skipped ]]; then
        N_KEPT=$((N_KEPT + 1))
        [[ "$status" == oom && "$bs" != max ]] && { [[ -z "${OOM_AT[$key]:-}" || $bs -lt ${OOM_AT[$key]} ]] && OOM_AT[$key]=$bs; }
        printf '[%d/%d] %-44s kept (%s, from an earlier run)\n' "$i" "$TOTAL" "$label" "$status"
        continue
    fi
    bracket=""
    if [[ "$bs" == max && $USE_BRACKET -eq 1 ]]; then
        bracket="$(grid_bracket "$exp" "$prec")"
        [[ -n "$bracket" ]] && label="$label ($bracket)"
    fi
    if [[ $DRY_RUN -eq 1 ]]; then printf '[%d/%d] %-44s would run -> %s\n' "$i" "$TOTAL" "$label" "$out"; continue; fi
    args=(--experiment "$exp" --precision "$prec" --output "$out" "${COMMON[@]}")
    if [[ "$bs" == max ]]; then
        args+=("${MAXARGS[@]}" --batch-size 1)
        [[ -n "$bracket" ]] && args+=(--max-batch-bracket "$bracket")
    else
        args+=(--batch-size "$bs")
        if [[ -n "${OOM_AT[$key]:-}" && $bs -gt ${OOM_AT[$key]} ]]; then
            "$PY" -m memory_test.diffusion_profile.single_experiment "${args[@]}" --record-only skipped \
                --record-message "not run: batch ${OOM_AT[$key]} of $exp ($prec) already ran out of memory" 2>/dev/null
            N_SKIP=$((N_SKIP + 1))
            printf '[%d/%d] %-44s skipped (batch %s ran out of memory)\n' "$i" "$TOTAL" "$label" "${OOM_AT[$key]}"
            continue
        fi
    fi
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
    case $rc in
        0) N_OK=$((N_OK + 1)); result="ok" ;;
        3) N_OOM=$((N_OOM + 1)); result="OOM"; [[ "$bs" != max ]] && OOM_AT[$key]=$bs ;;
        *)
            N_ERR=$((N_ERR + 1))
            if [[ "$(record_status "$out")" == missing ]]; then  # crashed (signal, usage error): record it anyway
                msg="single_experiment.py exited with code $rc without a record: $(tail -n 3 "$LOG" | tr '\n' ' ' | cut -c1-600)"
                extra=(); [[ "$bs" == max ]] && extra=(--find-max-batch)
                "$PY" -m memory_test.diffusion_profile.single_experiment --experiment "$exp" --precision "$prec" \
                    --output "$out" "${COMMON[@]}" --batch-size "${bs/max/1}" "${extra[@]}" --record-only error \
                    --record-message "$msg" >/dev/null 2>&1
            fi
            result="ERROR (rc=$rc): $(tail -n 1 "$LOG" | cut -c1-160)" ;;
    esac
    elapsed=$(( $(date +%s) - START ))
    remaining=$((TOTAL - i))
    eta=$(( RAN_MS / RAN * remaining / 1000 ))
    printf '[%d/%d] %-44s %s (%d.%ds) | elapsed %s | ETA %s\n' "$i" "$TOTAL" "$label" "$result" $((dt_ms / 1000)) \
        $((dt_ms % 1000 / 100)) \
        "$(fmt_s "$elapsed")" "$(fmt_s "$eta")"
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
