"""visualize_memory_breakdown.py on fixture records (two GPUs, oom, skipped, max-batch, corrupt and foreign files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from memory_test.diffusion_profile import visualize_memory_breakdown as viz
from memory_test.diffusion_profile.plots import tables
from memory_test.records.io import load_records
from tests.conftest import FIXTURE_RECORDS as FIXTURES
from tests.conftest import REPO

SCRIPT = REPO / "memory_test" / "diffusion_profile" / "visualize_memory_breakdown.py"
GiB = 2**30


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """Run the script in a fresh interpreter and report whether torch got imported."""
    results = tmp_path_factory.mktemp("results")
    for p in FIXTURES.glob("*.json"):
        shutil.copy(p, results / p.name)
    (results / "plots").mkdir()
    (results / "plots" / "max_batch__Old_GPU_setting.png").write_bytes(b"stale")  # from an earlier run: removed
    (results / "plots" / "my_notes.png").write_bytes(b"user file")  # not a chart of the script: kept
    probe = "\n".join(
        [
            "import runpy, sys",
            f"script = {str(SCRIPT)!r}",
            "sys.argv = [script, '--results-dir', sys.argv[1]]",
            "try:",
            "    runpy.run_path(script, run_name='__main__')",
            "except SystemExit:",
            "    pass",
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(results)], capture_output=True, text=True, timeout=300)
    return results, proc


def test_never_imports_torch(plotted):
    _, proc = plotted
    assert "NO_TORCH" in proc.stdout, proc.stdout + proc.stderr


def test_charts_per_gpu_and_summary(plotted):
    results, proc = plotted
    plots = results / "plots"
    names = sorted(p.name for p in plots.glob("*.png"))
    h200 = [n for n in names if "NVIDIA_H200" in n]
    a100 = [n for n in names if "A100" in n]
    assert (
        not set(h200) & set(a100) and len(h200) + len(a100) == len(names) - 1
    )  # - my_notes.png  # never mixed in one chart
    for kind in ("breakdown", "peak_memory_vs_batch", "time_throughput_vs_batch", "memory_time_tradeoff"):
        assert any(n.startswith(kind + "__") for n in h200), kind
    assert any(n.startswith("ratio_to_vanilla__") for n in h200)
    assert any(n.startswith("max_batch__") for n in h200)
    assert "max_batch__Old_GPU_setting.png" not in names and (plots / "my_notes.png").read_bytes() == b"user file"
    for p in plots.glob("*__*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    summary = (plots / "summary.md").read_text()
    assert "## DiT-XL/2 256px, fp32, flash attention on NVIDIA H200" in summary
    assert "on NVIDIA A100-SXM4-80GB" in summary
    assert "| bookkeeping | 32 | OOM |" in summary and "| bookkeeping | 64 | SKIPPED |" in summary
    assert "| ghost | 8 | ok | 15.00 |" in summary  # GiB, from the fixture's 15 GiB peak
    assert "| ghost | 48 | 49 | search |" in summary  # max batch and first OOM from the search record
    assert "| vanilla | 32 |  | grid |" in summary  # lower bound from the grid, nothing ran out of memory
    assert "Skipped files" in summary and "corrupt_truncated.json" in summary and "foreign.json" in summary
    assert "corrupt_truncated.json" in proc.stderr and "warning" in proc.stderr


def test_ratios_to_vanilla_and_oom_rows():
    recs = load_records(FIXTURES, warn=lambda msg: None)
    assert len(recs) == 9  # the corrupt and the foreign file are skipped
    runs, maxb = tables.records_to_frames(recs)
    runs = tables.add_vanilla_ratios(runs)
    h200 = runs[runs["device"] == "NVIDIA H200"].set_index(["experiment", "batch_size"])
    assert h200.loc[("ghost", 8), "mem_x_vanilla"] == pytest.approx(15 / 14)
    assert h200.loc[("ghost", 32), "time_x_vanilla"] == pytest.approx(700 / 330)
    assert h200.loc[("vanilla", 8), "mem_x_vanilla"] == pytest.approx(1.0)
    assert h200.loc[("bookkeeping", 32), "status"] == "oom"
    assert h200.loc[("bookkeeping", 32), "mem_x_vanilla"] != h200.loc[("bookkeeping", 32), "mem_x_vanilla"]  # NaN
    # the A100 vanilla run is not the reference of H200 runs
    a100 = runs[runs["device"] != "NVIDIA H200"]
    assert list(a100["experiment"]) == ["vanilla"] and a100["mem_x_vanilla"].iloc[0] == pytest.approx(1.0)
    table = tables.max_batch_table(runs[runs["device"] == "NVIDIA H200"], maxb)
    assert dict(zip(table["experiment"], table["max_batch"])) == {"bookkeeping": 8, "ghost": 48, "vanilla": 32}
    assert table.set_index("experiment").loc["bookkeeping", "first_oom"] == 32  # the grid's OOM bounds it


def test_empty_or_missing_folder(tmp_path):
    assert viz.main(["--results-dir", str(tmp_path / "nope")]) == 2
    (tmp_path / "junk.json").write_text(json.dumps([1, 2]))
    assert viz.main(["--results-dir", str(tmp_path)]) == viz.EXIT_SKIPPED  # junk.json was skipped
    assert "No valid records" in (tmp_path / "plots" / "summary.md").read_text()


def test_noise_multiplicity_groups_table_and_chart(tmp_path):
    from memory_test.diffusion_profile.plots import noise_multiplicity as nm

    setting = dict(device="GPU", model="DiT-XL/2", image_size=256, precision="fp32", attention="flash", batch_size=8)
    rows = [
        dict(setting, experiment=e, noise_multiplicity=k, status="ok", median_ms=ms, total_bytes=gib * 2**30)
        for e, k, ms, gib in [
            ("vanilla", 1, 100.0, 10),
            ("vanilla", 4, 300.0, 30),
            ("ghost", 1, 200.0, 11),
            ("ghost", 4, 450.0, 31),
            ("opacus_ghost", 1, 400.0, 12),  # one K only: not part of the K chart
        ]
    ] + [dict(setting, experiment="ghost", noise_multiplicity=16, status="oom", median_ms=None, total_bytes=None)]
    runs = tables.add_vanilla_ratios(pd.DataFrame(rows).assign(batch_size=8))
    groups = nm.k_groups(runs)
    assert len(groups) == 1 and set(groups[0][1]["experiment"]) == {"vanilla", "ghost"}
    table = nm.k_table(groups[0][1]).set_index(["experiment", "noise_multiplicity"])
    assert table.loc[("ghost", 4), "x_own_k1"] == pytest.approx(2.25)
    assert table.loc[("ghost", 4), "time_x_vanilla"] == pytest.approx(1.5)
    chart = nm.plot_k(groups[0][1], groups[0][0], tmp_path / "k.png", {})
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert "| ghost | 4 | 450.0 | 1.5 | 2.25 |" in nm.k_section(groups[0][1], groups[0][0], chart)


def test_scaling_pairs_sharded_runs_with_their_single_process_family(tmp_path):
    from memory_test.diffusion_profile.plots import scaling as plot_scaling

    bk = {"norm": "ghost", "strategy": "bookkeeping"}
    base = dict(model="DiT-XL/2", image_size=256, precision="fp32", noise_multiplicity=1, attention="flash")
    base.update(status="ok", batch_size=32, hardware="GPU", optimizer_state=4 * 2**30)
    rows = [
        dict(base, experiment="bookkeeping", scaling_family="ghost norms, bookkeeping", world_size=1,
             samples_per_s=100.0, peak_bytes_max=80 * 2**30, weights=3 * 2**30, gradients=3 * 2**30),
        dict(base, experiment="ghost_fsdp_bk", scaling_family="ghost norms, bookkeeping", world_size=2,
             samples_per_s=190.0, peak_bytes_max=75 * 2**30, weights=1.5 * 2**30, gradients=1.5 * 2**30,
             optimizer_state=2 * 2**30),
        dict(base, experiment="opacus_ghost", scaling_family=None, world_size=1, samples_per_s=50.0,
             peak_bytes_max=90 * 2**30, weights=3 * 2**30, gradients=3 * 2**30),  # no family: not compared
        dict(base, experiment="vanilla", scaling_family="vanilla", world_size=1, samples_per_s=200.0,
             peak_bytes_max=70 * 2**30, weights=3 * 2**30, gradients=3 * 2**30),  # one world size only
    ]  # fmt: skip
    groups = plot_scaling.scaling_groups(pd.DataFrame(rows))
    assert len(groups) == 1 and set(groups[0][1]["experiment"]) == {"bookkeeping", "ghost_fsdp_bk"}
    t = plot_scaling.scaling_table(groups[0][1]).set_index("world_size")
    assert t.loc[2, "speedup_vs_1"] == pytest.approx(1.9) and t.loc[2, "state_x_1gpu"] == pytest.approx(0.5)
    chart = plot_scaling.plot_scaling(groups[0][1], groups[0][0], tmp_path / "s.png")
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert "| ghost norms, bookkeeping | ghost_fsdp_bk | 2 | 190.0 | 1.9 | 75.0 | 5.0 | 0.5 |" in (
        plot_scaling.scaling_section(groups[0][1], groups[0][0], chart)
    )
    # records carry the mode's composition; a sharded mode and its single-process twin get one family
    rec = SimpleNamespace(experiment="ghost_fsdp_bk", config=SimpleNamespace(mode=dict(bk, sharding="fsdp")))
    assert tables.scaling_family(rec) == "ghost norms, bookkeeping"
    assert tables.scaling_family(SimpleNamespace(experiment="vanilla", config=SimpleNamespace(mode=None))) == "vanilla"


def test_noise_multiplicity_chart_keeps_eager_and_compiled_runs_apart(tmp_path):
    from memory_test.diffusion_profile.plots import noise_multiplicity as nm

    setting = dict(device="CPU", model="DiT-tiny", image_size=64, precision="fp32", attention="flash", batch_size=2)
    rows = [
        dict(setting, experiment=e, compile=c, noise_multiplicity=k, status="ok", median_ms=ms, total_bytes=2**20)
        for e, c, k, ms in [
            ("vanilla", "off", 1, 16.0), ("vanilla", "off", 2, 11.5),
            ("flash_clip_bk", "off", 1, 40.0), ("flash_clip_bk", "off", 2, 15.4),
            ("vanilla", "default", 1, 12.9), ("flash_clip_bk", "default", 1, 9.9),  # compiled: K=1 only
        ]
    ]  # fmt: skip
    runs = tables.add_vanilla_ratios(pd.DataFrame(rows))
    groups = nm.k_groups(runs)
    assert [g["compile"] for g, _ in groups] == ["off"]  # the compiled runs span one K: no chart of their own
    assert set(groups[0][1]["compile"]) == {"off"}  # and never join the eager line (nor its K=1 baseline)
    table = nm.k_table(groups[0][1]).set_index(["experiment", "noise_multiplicity"])
    assert table.loc[("flash_clip_bk", 2), "x_own_k1"] == pytest.approx(15.4 / 40.0)
    frame = pd.DataFrame(rows).drop(columns="compile")  # hand-built frames from before compile: eager
    assert [g["compile"] for g, _ in nm.k_groups(tables.add_vanilla_ratios(frame))] == ["off"]
