"""The charts as a reader sees them: the breakdown fits a screen, has no negative segment, keeps its legend inside
the figure and says in words which batch sizes nothing ran at; noisy timings are marked; CPU says what it is."""

from __future__ import annotations

import struct

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle

from memory_test.diffusion_profile.plots import breakdown, style
from memory_test.diffusion_profile.plots.draw import draw_all
from memory_test.diffusion_profile.plots.tables import SETTING_KEYS, add_vanilla_ratios, records_to_frames, select
from memory_test.records.io import load_records
from tests.conftest import FIXTURE_RECORDS, REPO

H200 = REPO / "results" / "h200_xl2"


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


@pytest.fixture(scope="module")
def h200_fp32():
    runs, _ = records_to_frames(load_records(H200, warn=lambda m: None))
    runs = add_vanilla_ratios(runs)
    setting = {"device": "NVIDIA H200", "model": "DiT-XL/2", "image_size": 256, "precision": "fp32",
               "noise_multiplicity": 1, "attention": "flash"}  # fmt: skip
    return select(runs, setting), setting


def test_breakdown_is_a_grid_that_fits_a_screen_without_negative_segments(h200_fp32, tmp_path, monkeypatch):
    df, setting = h200_fp32
    assert len(df["batch_size"].unique()) == 5  # one panel each used to make it 4840 px wide
    figures = []
    real_finish = breakdown.finish
    monkeypatch.setattr(breakdown, "finish", lambda fig, out, **kw: figures.append(fig) or real_finish(fig, out, **kw))
    out = breakdown.plot_breakdown(df, setting, tmp_path / "b.png")
    width, height = _png_size(out)
    assert width <= 2000 and height <= 1200
    fig = figures[0]
    bars = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
    assert bars and min(b.get_height() for b in bars) >= 0
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert 0 <= legend.x0 and legend.x1 <= fig.bbox.width and 0 <= legend.y0 and legend.y1 <= fig.bbox.height


def test_a_batch_where_nothing_ran_is_a_note_not_a_panel(h200_fp32):
    df, _ = h200_fp32
    drawn, notes = breakdown.panels_and_notes(df)
    assert drawn == [8, 32, 64, 128]
    assert notes == ["batch 256: no experiment ran (OOM: bookkeeping, flash_clip, flash_clip_bk, ghost, opacus_ghost, "
                     "vanilla; SKIPPED: opacus_hooks)"]  # fmt: skip


def test_the_summary_marks_noisy_timings_and_the_ratio_chart_draws_them_hollow(h200_fp32, tmp_path):
    df, _ = h200_fp32
    noisy = df[df["time_x_vanilla_noisy"]]
    assert set(noisy["batch_size"]) == {8}  # vanilla's own B=8 steps spread p80/p20 = 1.46
    drawing = draw_all(H200, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| vanilla | 8 | ok | 14.19 | 15.91 | 134.0 | 1.46 noisy |" in summary
    assert "| bookkeeping | 8 | ok |" in summary and "2.41 noisy |" in summary and "p80/p20" in summary
    assert not drawing.skipped


def test_cpu_sections_and_charts_say_the_ratios_are_not_meaningful(tmp_path):
    import json

    for name in ("vanilla_bs8.json", "ghost_bs8.json"):
        rec = json.loads((FIXTURE_RECORDS / name).read_text())
        rec["env"].update(device_type="cpu", gpu_name=None)
        (tmp_path / name).write_text(json.dumps(rec))
    draw_all(tmp_path, tmp_path / "plots")
    summary = (tmp_path / "plots" / "summary.md").read_text()
    assert "## DiT-XL/2 256px, fp32, flash attention on CPU" in summary and style.CPU_CAVEAT in summary
    assert sorted(p.name.split("__")[0] for p in (tmp_path / "plots").glob("*.png")) == [
        "breakdown", "memory_time_tradeoff", "peak_memory_vs_batch", "ratio_to_vanilla", "time_throughput_vs_batch",
    ]  # fmt: skip


def test_setting_keys_cover_every_column_the_charts_group_by():
    runs, _ = records_to_frames(load_records(FIXTURE_RECORDS, warn=lambda m: None))
    assert set(SETTING_KEYS) <= set(runs.columns) and isinstance(runs, pd.DataFrame)
