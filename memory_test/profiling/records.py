"""The versioned JSON result record: construction helpers, validation and atomic writes (standard library only).

The schema is documented in ``docs/RESULTS_SCHEMA.md``. Bytes and milliseconds are stored; conversions to MiB or
seconds happen only for display (``peak_memory_mb`` is kept as a legacy key of the original scripts).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from memory_test.cli_common.files import atomic_write_json, output_path_problem

SCHEMA_NAME = "memory_test.dit_profile"
SCHEMA_VERSION = 1

STATUSES = ("ok", "oom", "error", "skipped")
FINISHED_STATUSES = ("ok", "oom", "skipped")  # a sweep does not rerun these; "error" records are retried
RECORD_TYPES = ("run", "max_batch")

# Exit codes of single_experiment.py
EXIT_OK = 0
EXIT_ERROR = 1  # the run failed; an "error" record was written
EXIT_USAGE = 2  # bad input; nothing was written (argparse uses 2 as well)
EXIT_OOM = 3  # out of memory; an "oom" record was written

_REQUIRED_TOP = ("schema", "schema_version", "record_type", "experiment", "status", "config", "env")


def validate_record(rec: Any) -> list[str]:
    """Problems that make ``rec`` unusable as a result record of this schema (empty list: valid)."""
    if not isinstance(rec, dict):
        return [f"not a JSON object ({type(rec).__name__})"]
    problems = [f"missing key {k!r}" for k in _REQUIRED_TOP if k not in rec]
    if problems:
        return problems
    if rec["schema"] != SCHEMA_NAME:
        problems.append(f"schema is {rec['schema']!r}, expected {SCHEMA_NAME!r}")
    if rec["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {rec['schema_version']!r} is not {SCHEMA_VERSION}")
    if rec["record_type"] not in RECORD_TYPES:
        problems.append(f"record_type {rec['record_type']!r} not in {RECORD_TYPES}")
    if rec["status"] not in STATUSES:
        problems.append(f"status {rec['status']!r} not in {STATUSES}")
    if not isinstance(rec["config"], dict):
        problems.append("config is not an object")
    elif not isinstance(rec["config"].get("batch_size"), int):
        problems.append("config.batch_size is not an integer")
    if rec["status"] in ("error", "oom", "skipped") and not rec.get("message"):
        problems.append(f"status {rec['status']!r} needs a message")
    if rec["status"] == "ok" and rec["record_type"] == "run":
        for key in ("timing", "memory", "model"):
            if not isinstance(rec.get(key), dict):
                problems.append(f"ok run record lacks {key!r}")
        timing = rec.get("timing") or {}
        if not timing.get("step_times_ms"):
            problems.append("ok run record has no step times")
    if rec["status"] == "ok" and rec["record_type"] == "max_batch":
        if not isinstance(rec.get("max_batch"), dict) or "max_batch_size" not in rec["max_batch"]:
            problems.append("ok max_batch record lacks max_batch.max_batch_size")
    return problems


def write_record_atomic(path: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as JSON to ``path`` via a temporary file in the same folder and ``os.replace``.

    Readers see either the old file, no file, or the complete new file; never a partial one (also on Ctrl-C). The
    file gets the umask's mode, like any file the user writes. Missing parent folders are created.
    """
    problems = validate_record(record)
    if problems:
        raise ValueError("refusing to write an invalid record: " + "; ".join(problems))
    return atomic_write_json(path, record)


def check_writable_output(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot receive a record (None if it can). Creates and writes nothing."""
    path = Path(path)
    why = output_path_problem(path)
    if why == "is a directory":
        return f"--output {path} is a directory; give a file name such as {path / 'result.json'}"
    return f"cannot write --output {path}: {why}" if why else None


def load_record(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(record, None) for a valid record file, else (None, reason)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable JSON ({e.__class__.__name__}: {e})"
    problems = validate_record(rec)
    if problems:
        return None, "not a result record of this suite: " + "; ".join(problems[:3])
    return rec, None


def load_records(folder: str | os.PathLike, *, warn=None) -> list[dict]:
    """Every valid record under ``folder`` (recursively). Corrupt or foreign JSON files are skipped with a warning.

    Each returned record gets a ``_path`` key (not part of the schema) naming its file.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    out = []
    for p in sorted(Path(folder).rglob("*.json")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):  # temp files, probe folders
            continue
        rec, why = load_record(p)
        if rec is None:
            warn(f"skipping {p}: {why}")
            continue
        rec["_path"] = str(p)
        out.append(rec)
    return out


def record_status(path: str | os.PathLike) -> str:
    """Status of the record at ``path``: one of STATUSES, 'missing' or 'invalid' (used by the sweep's resume)."""
    if not Path(path).exists():
        return "missing"
    rec, _ = load_record(path)
    return "invalid" if rec is None else rec["status"]


def _main(argv: list[str]) -> int:
    """``python -m memory_test.profiling.records status FILE...`` prints one status per line."""
    if len(argv) >= 2 and argv[0] == "status":
        for p in argv[1:]:
            print(record_status(p))
        return 0
    if len(argv) >= 2 and argv[0] == "validate":
        bad = 0
        for p in argv[1:]:
            _, why = load_record(p)
            print(f"{p}: {'ok' if why is None else why}")
            bad += why is not None
        return 1 if bad else 0
    print("usage: python -m memory_test.profiling.records {status|validate} FILE...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def device_label(rec_or_env: dict) -> str:
    """Short name of the hardware a record was measured on (records with different labels are never mixed)."""
    env = rec_or_env.get("env", rec_or_env)
    if env.get("device_type") == "cuda":
        return env.get("gpu_name") or "unknown GPU"
    return "CPU"
