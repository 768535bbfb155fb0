"""The eager vs torch.compile charts and tables, on fixture records copied with a compile setting and scaled times."""

from __future__ import annotations

import json
import shutil

import pytest

from memory_test.diffusion_profile.plots import compile_compare as cc
from memory_test.diffusion_profile.plots.draw import draw_all
from memory_test.diffusion_profile.plots.tables import add_vanilla_ratios, records_to_frames
from memory_test.records.io import load_records
from memory_test.records.record import NOISY_SPREAD
from tests.conftest import FIXTURE_RECORDS

H200_RUNS = ("vanilla_bs8.json", "vanilla_bs32.json", "ghost_bs8.json", "ghost_bs32.json", "bookkeeping_bs8.json")
TIMES = ("median_ms", "p20_ms", "p80_ms", "mean_ms", "min_ms", "max_ms", "measured_wall_ms")


def _compiled(name: str, mode: str, speed: float, noisy: bool = False) -> dict:
    """A fixture record as if run under ``torch.compile(mode=mode)``, its steps ``speed`` times as fast (and, if
    ``noisy``, spread: p80/p20 above NOISY_SPREAD)."""
    rec = json.loads((FIXTURE_RECORDS / name).read_text())
    rec["config"]["compile"] = mode
    timing = rec.get("timing")
    if timing:
        timing["step_times_ms"] = [t / speed for t in timing["step_times_ms"]]
        timing.update({k: timing[k] / speed for k in TIMES if timing.get(k) is not None})
        timing.update(samples_per_s=timing["samples_per_s"] * speed, rows_per_s=timing["rows_per_s"] * speed)
        if noisy:
            timing["p80_ms"] = timing["p20_ms"] * (NOISY_SPREAD + 0.3)
    return rec


def _results(tmp_path, compiled: dict[str, tuple]):
    """A results folder: the H200 fixtures as they are (no config.compile: eager), plus compiled copies."""
    results = tmp_path / "results"
    results.mkdir(parents=True)
    for name in (*H200_RUNS, "bookkeeping_bs32.json"):
        shutil.copy(FIXTURE_RECORDS / name, results / name)
    for name, (mode, *how) in compiled.items():
        (results / f"{mode}_{name}").write_text(json.dumps(_compiled(name, mode, *how)))
    return results


def _medians(results) -> dict:
    """(experiment, batch, compile) -> median ms, read back from the record files."""
    out = {}
    for p in results.glob("*.json"):
        rec = json.loads(p.read_text())
        if rec["status"] == "ok":
            key = (rec["experiment"], rec["config"]["batch_size"], rec["config"].get("compile", "off"))
            out[key] = rec["timing"]["median_ms"]
    return out


def _runs(results):
    runs, _ = records_to_frames(load_records(results, warn=lambda m: None))
    return add_vanilla_ratios(runs)


@pytest.fixture
def eager_and_default(tmp_path):
    """Vanilla and ghost at B=8 compiled (vanilla faster, ghost slower than eager); bookkeeping B=32 OOM compiled."""
    return _results(
        tmp_path,
        {
            "vanilla_bs8.json": ("default", 1.25),
            "ghost_bs8.json": ("default", 0.8),
            "bookkeeping_bs32.json": ("default", 1.0),
        },
    )


def test_a_group_needs_ok_runs_under_two_compile_settings(tmp_path, eager_and_default):
    assert cc.compile_groups(_runs(_results(tmp_path / "eager", {}))) == []  # eager only
    only_oom = _results(tmp_path / "oom", {"bookkeeping_bs32.json": ("default", 1.0)})
    assert cc.compile_groups(_runs(only_oom)) == []  # the compiled setting has no ok run
    groups = cc.compile_groups(_runs(eager_and_default))
    assert len(groups) == 1
    group, rows = groups[0]
    assert group == {"device": "NVIDIA H200", "model": "DiT-XL/2", "image_size": 256, "precision": "fp32",
                     "noise_multiplicity": 1, "attention": "flash"}  # fmt: skip
    assert cc.compile_settings(rows) == ["off", "default"]
    assert len(rows) == len(H200_RUNS) + 1 + 3  # failed runs stay in the group: the chart names them


def test_records_without_config_compile_are_eager(eager_and_default):
    assert "compile" not in json.loads((eager_and_default / "ghost_bs8.json").read_text())["config"]
    _, rows = cc.compile_groups(_runs(eager_and_default))[0]
    eager = rows[rows["compile"] == "off"]
    assert sorted(eager["path"].map(lambda p: p.rsplit("/", 1)[-1])) == sorted((*H200_RUNS, "bookkeeping_bs32.json"))


def test_summary_table_ratios_come_from_the_records(eager_and_default):
    medians = _medians(eager_and_default)
    fastest_vanilla_8 = min(ms for (e, b, _), ms in medians.items() if e == "vanilla" and b == 8)
    assert fastest_vanilla_8 == medians[("vanilla", 8, "default")]  # compiling made vanilla the faster one
    _, rows = cc.compile_groups(_runs(eager_and_default))[0]
    table = cc.compile_table(rows).set_index(["experiment", "batch"])
    ghost = table.loc[("ghost", 8)]
    x_fastest = medians[("ghost", 8, "default")] / fastest_vanilla_8
    assert ghost["default: ms (× fastest vanilla)"] == f"{medians[('ghost', 8, 'default')]:.1f} ({x_fastest:.2f}×)"
    eager_x = medians[("ghost", 8, "off")] / fastest_vanilla_8
    assert ghost["eager: ms (× fastest vanilla)"] == f"{medians[('ghost', 8, 'off')]:.1f} ({eager_x:.2f}×)"
    compiled_over_eager = medians[("ghost", 8, "default")] / medians[("ghost", 8, "off")]
    assert ghost["default / eager"] == f"{compiled_over_eager:.2f}" and compiled_over_eager > 1
    assert table.loc[("ghost", 32), "default / eager"] == ""  # ghost B=32 ran eager only
    assert table.loc[("ghost", 8), "eager: peak (GiB)"] == "15.00"  # the fixture's 15 GiB peak


def test_an_oom_run_shows_as_oom_in_the_table_and_the_chart(eager_and_default, tmp_path, monkeypatch):
    _, rows = cc.compile_groups(_runs(eager_and_default))[0]
    table = cc.compile_table(rows).set_index(["experiment", "batch"])
    assert table.loc[("bookkeeping", 32), "default: ms (× fastest vanilla)"] == "oom"
    assert table.loc[("bookkeeping", 32), "eager: ms (× fastest vanilla)"] == "oom"
    assert table.loc[("bookkeeping", 32), "default / eager"] == ""
    figures = []
    real_finish = cc.finish
    monkeypatch.setattr(cc, "finish", lambda fig, out, *a, **kw: figures.append(fig) or real_finish(fig, out, *a, **kw))
    group, rows = cc.compile_groups(_runs(eager_and_default))[0]
    cc.plot_compile(rows, group, tmp_path / "c.png", cc.compile_colors(rows))
    panels = {ax.get_title(): ax for ax in figures[0].axes if ax.get_visible()}
    assert sorted(panels) == ["batch 32", "batch 8"]
    b32 = panels["batch 32"]
    assert [t.get_text() for t in b32.get_xticklabels()] == ["vanilla", "bookkeeping", "ghost"]
    assert [t.get_text().strip() for t in b32.texts if t.get_text().strip() == "oom"] == ["oom", "oom"]
    assert len(b32.patches) == 2  # bars for the ok runs only (vanilla and ghost, eager)


def test_draw_all_writes_the_chart_and_its_summary_section(eager_and_default, tmp_path):
    out = tmp_path / "plots"
    out.mkdir()
    (out / "compile__Old_GPU.png").write_bytes(b"stale")  # a compile chart of an earlier run: removed
    drawing = draw_all(eager_and_default, out)
    assert not drawing.skipped
    assert [p.name for p in out.glob("compile__*.png")] == ["compile__NVIDIA_H200_DiT-XL_2_256_fp32_1_flash.png"]
    chart = next(out.glob("compile__*.png"))
    assert chart in drawing.written and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    section = summary.split("## Eager vs torch.compile: DiT-XL/2 256px, fp32, flash attention on NVIDIA H200")[1]
    assert f"Chart: [{chart.name}]({chart.name})" in section
    assert "| eager: ms (× fastest vanilla) | eager: peak (GiB) | default: ms (× fastest vanilla) |" in section


def test_a_ratio_to_a_noisy_fastest_vanilla_is_marked_noisy(tmp_path, monkeypatch):
    results = _results(tmp_path, {"vanilla_bs8.json": ("default", 1.25, True), "ghost_bs8.json": ("default", 1.1)})
    _, rows = cc.compile_groups(_runs(results))[0]
    table = cc.compile_table(rows).set_index(["experiment", "batch"])
    assert table.loc[("ghost", 8), "default: ms (× fastest vanilla)"].endswith("× noisy)")  # the noisy vanilla's
    assert table.loc[("ghost", 8), "eager: ms (× fastest vanilla)"].endswith("× noisy)")  # both are its ratio
    assert table.loc[("ghost", 32), "eager: ms (× fastest vanilla)"].endswith("×)")  # a steady vanilla at B=32
    figures = []
    real_finish = cc.finish
    monkeypatch.setattr(cc, "finish", lambda fig, out, *a, **kw: figures.append(fig) or real_finish(fig, out, *a, **kw))
    group, rows = cc.compile_groups(_runs(results))[0]
    cc.plot_compile(rows, group, tmp_path / "c.png", cc.compile_colors(rows))
    labels = {ax.get_title(): [t.get_text().strip() for t in ax.texts] for ax in figures[0].axes}
    assert labels["batch 8"] and all(t.startswith(cc.NOISY_MARK) for t in labels["batch 8"])
    assert labels["batch 32"] and not any(t.startswith(cc.NOISY_MARK) for t in labels["batch 32"])
