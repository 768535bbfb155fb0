"""Typed records: every committed record reads into the current types (version 1 upgraded, documented fields
derived once), a record written by this version reads back unchanged, and a bad field is named."""

from __future__ import annotations

import json
import math

import pytest

from memory_test.records.fields import FieldError
from memory_test.records.io import load_record, load_records, parse_record
from memory_test.records.ranks import RankResult, RunShape, combine
from memory_test.records.record import SCHEMA_VERSION, Record
from memory_test.records.timing import summarize
from tests.conftest import FIXTURE_RECORDS, REPO

COMMITTED = sorted((REPO / "results").rglob("*.json")) + sorted(FIXTURE_RECORDS.glob("*.json"))


def _records():
    return load_records(REPO / "results", warn=lambda m: None) + load_records(FIXTURE_RECORDS, warn=lambda m: None)


def test_every_committed_record_of_the_suite_reads():
    ours = [p for p in COMMITTED if '"memory_test.dit_profile"' in p.read_text(errors="replace")]
    readable = [p for p in ours if load_record(p)[0] is not None]
    assert len(ours) >= 60 and readable == [p for p in ours if p.name != "corrupt_truncated.json"]


@pytest.mark.parametrize("rec", _records(), ids=lambda r: r.path.split("/")[-1])
def test_typed_reading_is_idempotent_and_a_current_record_round_trips(rec):
    again = Record.from_dict(rec.to_dict())
    assert again == rec.replace(path=None) or again.replace(path=rec.path) == rec
    current = rec.replace(schema_version=SCHEMA_VERSION).to_dict()
    assert Record.from_dict(current).to_dict() == current  # what this version writes, it reads back unchanged


def test_version_1_records_get_what_they_lack_derived_once():
    bk = load_record(REPO / "results/h200_xl2/bookkeeping__DiT-XL-2__img256__bs8__fp32__k1__fa.json")[0]
    hooks = load_record(REPO / "results/h200_xl2/opacus_hooks__DiT-XL-2__img256__bs8__fp32__k1__fa.json")[0]
    assert bk.schema_version == 1
    assert bk.memory.breakdown.overlapping == ["dp_state"]  # the engine's caches overlap activations
    assert hooks.memory.breakdown.overlapping == []  # upstream per-sample gradients are their own allocations
    old = json.loads((FIXTURE_RECORDS / "vanilla_bs8.json").read_text())
    assert "world_size" not in old["config"]
    cfg = Record.from_dict(old).config
    assert (cfg.world_size, cfg.global_batch_size, cfg.fsdp2) == (1, cfg.batch_size, False)


def test_the_breakdown_stacks_without_negative_parts_on_the_gpu():
    gpu = [r for r in _records() if r.env.device_type == "cuda" and r.memory and r.memory.breakdown]
    gpu = [r for r in gpu if r.memory.breakdown.total_bytes is not None]
    negative = [r.path for r in gpu if min(r.memory.breakdown.parts_bytes.values()) < 0]
    assert negative  # the raw remainder of book-keeping at B=8 is below zero: its caches overlap activations
    for r in gpu:
        b = r.memory.breakdown
        assert min(b.stacked_bytes.values()) >= 0, r.path
        assert sum(b.stacked_bytes.values()) == pytest.approx(b.total_bytes)  # stacked parts add up to the peak


def test_a_wrongly_typed_or_missing_field_is_named():
    rec = json.loads((FIXTURE_RECORDS / "ghost_bs8.json").read_text())
    cases = [
        (("timing", "median_ms"), "fast", "timing.median_ms is 'fast' (str), expected a number"),
        (("memory", "breakdown", "parts_bytes", "weights"), "many", "memory.breakdown.parts_bytes.weights is 'many'"),
        (("timing", "step_times_ms"), [1.0, "x"], "timing.step_times_ms[1] is 'x'"),
        (("config", "use_flash_attention"), 1, "config.use_flash_attention is 1 (int), expected true/false"),
        (("config", "model"), None, "config.model is missing"),
        # well typed, but no run produces it
        (("timing", "step_times_ms"), [1.0, -2.0], "timing.step_times_ms[1] is -2.0 (float), expected a finite "
         "number >= 0"),
        (("memory", "breakdown", "parts_bytes", "weights"), math.inf, "memory.breakdown.parts_bytes.weights is inf "
         "(float), expected a finite number"),
        (("config", "noise_multiplicity"), 0, "config.noise_multiplicity is 0 (int), expected a positive integer"),
        (("config", "compile"), "fast", "config.compile is 'fast' (str), expected one of off, default, max-autotune"),
    ]  # fmt: skip
    for path, value, message in cases:
        broken = json.loads(json.dumps(rec))
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        got, why = parse_record(broken)
        assert got is None and why.startswith(message), why
    with pytest.raises(FieldError, match="env is 'H200'"):
        Record.from_dict({**rec, "env": "H200"})


def test_unknown_keys_are_kept():
    rec = json.loads((FIXTURE_RECORDS / "ghost_bs8.json").read_text())
    rec["a_later_field"] = {"x": 1}
    rec["timing"]["a_later_stat"] = 2.0
    out = Record.from_dict(rec).to_dict()
    assert out["a_later_field"] == {"x": 1} and out["timing"]["a_later_stat"] == 2.0


def test_timing_statistics_and_noise():
    t = summarize([10.0, 11.0, 12.0, 13.0, 30.0], samples_per_step=8, rows_per_sample=2, method="perf_counter")
    assert t.median_ms == 12.0 and t.p20_ms == pytest.approx(10.8) and t.p80_ms == pytest.approx(16.4)
    assert t.samples_per_s == pytest.approx(8 / 0.012) and t.rows_per_s == pytest.approx(2 * t.samples_per_s)
    assert t.spread == pytest.approx(16.4 / 10.8) and t.noisy
    assert not summarize([10.0, 10.1, 10.2], 1).noisy


def test_ranks_combine_into_global_step_times_and_peaks():
    ranks = [RankResult([10.0, 20.0], 100, 110, 0.5), RankResult([12.0, 18.0], 200, 220, 0.7)]
    rank0 = summarize(ranks[0].step_ms, 4, method="perf_counter", warmup_steps=1, measured_steps=2)
    shape = RunShape(world_size=2, backend="gloo", sharded=True, per_rank_batch=4, noise_multiplicity=1, peak_source="")
    timing, block = combine(ranks, rank0, shape)
    assert timing.step_times_ms == [12.0, 20.0] and timing.rank0_step_times_ms == [10.0, 20.0]
    assert timing.samples_per_s == pytest.approx(8 / 0.016) == block.global_samples_per_s
    assert (block.peak_bytes_max, block.peak_bytes_mean, block.global_batch_size) == (220, 165, 8)
    assert block.per_rank_median_step_ms == [15.0, 15.0] and block.per_rank_final_mean_loss == [0.5, 0.7]
