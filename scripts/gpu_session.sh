#!/usr/bin/env bash
# The GPU measurements still owed, ready for one device call each (docs/NOTES.md "Next GPU session").
#
#   bash scripts/gpu_session.sh single    # 1 H200: opacus_ghost max batch, opacus_hooks bf16@128, TF32-rounding
#                                         # kernel bench, BK modes re-measured after the host-overhead changes
#   bash scripts/gpu_session.sh multi N   # N H200s (2 or 4): sharded update check, sharded sweep, 1-GPU comparison
#   bash scripts/gpu_session.sh clipping  # 1 H200: max ||clipped contribution|| / C, every mode x precision (issue 15)
#   bash scripts/gpu_session.sh clipping_cost  # 1 H200: the B=128 fp32/bf16 sweep with margins off, then on
#   bash scripts/gpu_session.sh compile_profile  # 1 H200 (issue 13): where a compiled step's time goes (B=8 with the
#                                         # host profile, B=128), and CUDA graphs for the book-keeping modes: exact vs
#                                         # upstream hooks, then timed against vanilla under reduce-overhead
#   bash scripts/gpu_session.sh grid PRECISION [COMPILES]  # 1 H200 (issue 13): vanilla and the four single-process
#                                         # DP modes at B = 8, 32, 128, for each compile setting (default: off,default),
#                                         # into results/h200_xl2_compile; a rerun resumes where a call stopped
#
# On the device box: installs the carried wheels (.whl/) into /tmp/site when opacus is missing, records the commit
# (set MEMORY_TEST_GIT_SHA in the command: the box's copy has no .git), bounds each part with `timeout` so that a
# slow part cannot eat the call, and tars every results folder it touched into $OUT/results.tgz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

PHASE="${1:-}"
N="${2:-2}"
if [[ "$PHASE" == grid ]]; then set -- "$1" "${2:-}" "${3:-off,default}"; fi
usage() { sed -n '2,12p' "$0"; exit 2; }
[[ "$PHASE" =~ ^(single|multi|clipping|clipping_cost|grid|compile_profile)$ ]] || usage
[[ "$PHASE" != multi || ( "$N" =~ ^[0-9]+$ && $N -ge 2 ) ]] || { echo "usage: $0 multi N (N >= 2 GPUs)" >&2; exit 2; }
[[ "$PHASE" != grid || "$N" =~ ^(fp32|bf16)$ ]] || { echo "usage: $0 grid fp32|bf16 [off,default]" >&2; exit 2; }
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_session_out}"
mkdir -p "$OUT"
if ! "$PY" -c "import opacus, diffusers" 2>/dev/null; then
    [[ -d .whl ]] || { echo "opacus/diffusers missing and no .whl/ carried (bash ../shared/gpu/fetch_wheels.sh)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHON="$PY"
[[ -z "${MEMORY_TEST_GIT_SHA:-}" ]] && echo "note: MEMORY_TEST_GIT_SHA is not set; records will carry git.sha null" >&2

S=memory_test/diffusion_profile/run_all_experiments.sh
C=(--model DiT-XL/2 --device cuda --num-iter 4 --warmup-iter 2 --no-plots)
TOUCHED=()
part() {  # seconds, log name, command...
    local secs=$1 name=$2
    shift 2
    echo "== $name (at most ${secs}s)"
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $?; last lines:"
    grep -v " kept (" "$OUT/$name.log" | tail -n 4 | sed 's/^/   /'
}

case "$PHASE" in
    single)
        TOUCHED=(results/h200_xl2 results/h200_xl2_host results/flash_norms)
        part 150 opacus_ghost_max bash $S "${C[@]}" --output-dir results/h200_xl2 --experiments opacus_ghost \
            --max-batch-only --max-batch-resolution 16
        part 60 opacus_hooks_bf16 bash $S "${C[@]}" --output-dir results/h200_xl2 --experiments opacus_hooks \
            --batch-sizes 128 --precisions bf16
        # TF32 rounding of fp32 kernel operands (off by default): its cost, and its error vs the truncation bias.
        part 150 tf32_rounding_bench env FLASH_NORMS_TF32_ROUNDING=1 "$PY" scripts/bench_flash_norms.py --quick \
            --dtypes fp32 --output results/flash_norms/h200_fp32_tf32_rounding.json \
            --markdown results/flash_norms/h200_fp32_tf32_rounding.md
        # The host-overhead changes postdate results/h200_xl2: same grid, new folder, same call for the ratios.
        part 330 bk_after_host_changes bash $S "${C[@]}" --output-dir results/h200_xl2_host \
            --experiments vanilla,bookkeeping,flash_clip_bk --batch-sizes 8,32,128
        ;;
    multi)
        TOUCHED=(results/fsdp_check "results/h200_xl2_w$N")
        mkdir -p results/fsdp_check
        for mode in ghost_fsdp_bk flash_fsdp_bk vanilla; do
            part 120 "fsdp_check_${mode}_w$N" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" \
                scripts/fsdp_check.py --model DiT-XL/2 --global-batch $((8 * N)) --mode "$mode" \
                --output "results/fsdp_check/xl2_${mode}_b$((8 * N))_w$N.json"
        done
        part 240 "sweep_w$N" bash $S "${C[@]}" --output-dir "results/h200_xl2_w$N" --nproc-per-node "$N" \
            --batch-sizes 32,64
        # The 1-GPU side of the scaling chart, measured in the same call: the unsharded modes at the same per-GPU batch.
        part 150 "sweep_w1_for_w$N" bash $S "${C[@]}" --output-dir "results/h200_xl2_w$N" \
            --experiments vanilla,bookkeeping,flash_clip_bk --batch-sizes 32,64
        ;;
    clipping)
        TOUCHED=(results/clipping_check)
        mkdir -p results/clipping_check
        part 500 clipping_check "$PY" scripts/gpu_check_clipping.py --variants before,after,after_rounding \
            --output results/clipping_check/h200_xl2_b32.json --markdown results/clipping_check/h200_xl2_b32.md
        ;;
    clipping_cost)
        # Same sweep twice in one call (each with its own vanilla): margins off (before) and on (after); the
        # ratio comparison needs no GPU (scripts/compare_ratio_sweeps.py, printed at the end).
        TOUCHED=(results/h200_xl2_margins_off results/h200_xl2_margins_on)
        for side in off on; do
            part 280 "sweep_margins_$side" env MEMORY_TEST_NORM_MARGINS="$([[ $side == on ]] && echo 1 || echo 0)" \
                bash $S "${C[@]}" --output-dir "results/h200_xl2_margins_$side" \
                --experiments vanilla,bookkeeping,flash_clip_bk,ghost,flash_clip --batch-sizes 128 --precisions fp32,bf16
        done
        "$PY" scripts/compare_ratio_sweeps.py --before results/h200_xl2_margins_off \
            --after results/h200_xl2_margins_on --markdown results/h200_xl2_margins_on/ratio_rise.md
        ;;
    compile_profile)
        TOUCHED=(results/profile/compiled results/compile_check/cuda_graphs)
        mkdir -p "${TOUCHED[@]}"
        part 130 profile_b8 "$PY" scripts/profile_modes.py --batch-size 8 --precision bf16 --compile default \
            --host-profile --modes vanilla,flash_clip_bk --out-dir results/profile/compiled
        part 130 profile_b128 "$PY" scripts/profile_modes.py --batch-size 128 --precision bf16 --compile default \
            --modes vanilla,flash_clip_bk --out-dir results/profile/compiled
        part 120 cuda_graphs_exact "$PY" scripts/compile_check.py --out-dir results/compile_check/cuda_graphs/exact \
            --parts exact --compile-mode reduce-overhead --exact-modes flash_clip_bk,bookkeeping
        part 160 cuda_graphs_time "$PY" scripts/compile_check.py --out-dir results/compile_check/cuda_graphs/time \
            --parts time --compile-mode reduce-overhead --variants compiled --experiments vanilla,flash_clip_bk \
            --batch-sizes 32,8 --precisions bf16
        ;;
    grid)
        # Eager first (short runs), then each compiled setting; --num-iter 10 (the issue's medians of >= 10 steps).
        # The Inductor/Triton caches start cold on a fresh machine: each compile_ms is that of a cold process unless
        # the same graph compiled earlier in the call (block graphs are shared by bookkeeping/flash_clip_bk and by
        # ghost/flash_clip at one batch size and precision). GRID_SECONDS bounds each setting's sweep (default 540):
        # keep the whole call under the device's per-call limit, so that the tar below still runs.
        TOUCHED=(results/h200_xl2_compile)
        for setting in ${3//,/ }; do
            part "${GRID_SECONDS:-540}" "grid_${N}_$setting" bash $S --model DiT-XL/2 --device cuda --num-iter 10 --warmup-iter 2 \
                --no-plots --output-dir results/h200_xl2_compile --compile "$setting" --precisions "$N" \
                --experiments vanilla,flash_clip_bk,bookkeeping,ghost,flash_clip --batch-sizes 8,32,128
        done
        ;;
    *) usage ;;
esac

tar czf "$OUT/results.tgz" "${TOUCHED[@]}" 2>/dev/null
echo "results in \$OUT/results.tgz: ${TOUCHED[*]} (extract at the repo root, then run the visualizer and commit)"
