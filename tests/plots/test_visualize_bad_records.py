"""The visualizer skips a record whose fields it cannot read, naming the file and the field, and draws the rest;
its exit code says that something was skipped."""

from __future__ import annotations

import json
import shutil

from memory_test.diffusion_profile import visualize_memory_breakdown as viz
from tests.conftest import FIXTURE_RECORDS as FIXTURES


def _variant(name: str, batch: int, change) -> dict:
    rec = json.loads((FIXTURES / name).read_text())
    rec["config"]["batch_size"] = batch
    change(rec)
    return rec


BROKEN = {  # file -> (record, the field its warning must name)
    "fast.json": (
        _variant("ghost_bs8.json", 16, lambda r: r["timing"].update(median_ms="fast")),
        "timing.median_ms is 'fast'",
    ),
    "env_text.json": (_variant("vanilla_bs8.json", 16, lambda r: r.update(env="an H200")), "env is 'an H200'"),
    "no_model.json": (_variant("vanilla_bs32.json", 64, lambda r: r["config"].pop("model")), "config.model is missing"),
    # well typed, but values no run can have
    "turbo.json": (
        _variant("ghost_bs32.json", 128, lambda r: r["config"].update(compile="turbo")),
        "config.compile is 'turbo' (str), expected one of off, default, max-autotune, reduce-overhead",
    ),
    "negative.json": (_variant("vanilla_bs8.json", -8, lambda r: None), "config.batch_size is -8"),
    "nan.json": (
        _variant("ghost_bs8.json", 24, lambda r: r["timing"].update(median_ms=float("nan"))),
        "timing.median_ms is nan (float), expected a finite number",
    ),
}


def test_wrongly_typed_records_are_skipped_by_name_and_the_rest_drawn(tmp_path, capsys):
    for name in ("vanilla_bs8.json", "ghost_bs8.json", "vanilla_bs32.json", "ghost_bs32.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    for name, (rec, _) in BROKEN.items():
        (tmp_path / name).write_text(json.dumps(rec))
    assert viz.main(["--results-dir", str(tmp_path)]) == viz.EXIT_SKIPPED
    err = capsys.readouterr().err
    summary = (tmp_path / "plots" / "summary.md").read_text()
    for name, (_, field) in BROKEN.items():
        warning = next(line for line in err.splitlines() if name in line)
        assert warning.startswith("warning: skipping") and field in warning, warning
        assert name in summary
    assert "nan" not in summary.lower().split("## skipped files")[0]  # no record drawn with a missing model
    assert "| ghost | 8 | ok |" in summary and "| vanilla | 32 | ok |" in summary  # the good records are drawn
    assert "| ghost | 16 |" not in summary and "| vanilla | 64 |" not in summary
    assert "| ghost | 128 |" not in summary and "| vanilla | -8 |" not in summary and "| ghost | 24 |" not in summary
    charts = list((tmp_path / "plots").glob("peak_memory_vs_batch__*.png"))
    assert len(charts) == 1 and charts[0].stat().st_size > 5000


def test_a_folder_without_records_is_bad_input_and_keeps_its_charts(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    old_chart = tmp_path / "plots" / "ratio_to_vanilla__old.png"
    old_chart.write_bytes(b"png")
    assert viz.main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"{viz.TOOL}: error: --results-dir {tmp_path} holds no JSON records — give the folder of a sweep's records"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["plots", old_chart.name]  # no summary.md, chart kept
