"""Records on disk: structural validation, atomic writes, reading one file or a folder (standard library only)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from memory_test.cli_common.files import atomic_write_json, output_path_problem
from memory_test.records.fields import FieldError
from memory_test.records.record import READABLE_VERSIONS, RECORD_TYPES, SCHEMA_NAME, STATUSES, Record

_REQUIRED_TOP = ("schema", "schema_version", "record_type", "experiment", "status", "config", "env")


def validate_record(rec: Any) -> list[str]:
    """Problems that make ``rec`` (a JSON object) unusable as a record of this schema (empty list: valid)."""
    if not isinstance(rec, dict):
        return [f"not a JSON object ({type(rec).__name__})"]
    problems = [f"missing key {k!r}" for k in _REQUIRED_TOP if k not in rec]
    if problems:
        return problems
    if rec["schema"] != SCHEMA_NAME:
        problems.append(f"schema is {rec['schema']!r}, expected {SCHEMA_NAME!r}")
    if rec["schema_version"] not in READABLE_VERSIONS:
        problems.append(f"schema_version {rec['schema_version']!r} is not one of {READABLE_VERSIONS}")
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
        if not (rec.get("timing") or {}).get("step_times_ms"):
            problems.append("ok run record has no step times")
    if rec["status"] == "ok" and rec["record_type"] == "max_batch":
        if not isinstance(rec.get("max_batch"), dict) or "max_batch_size" not in rec["max_batch"]:
            problems.append("ok max_batch record lacks max_batch.max_batch_size")
    return problems


def parse_record(data: Any) -> tuple[Record | None, str | None]:
    """(record, None) for a valid record object, else (None, why): the schema's structure, then every field's type."""
    problems = validate_record(data)
    if problems:
        return None, "not a result record of this suite: " + "; ".join(problems[:3])
    try:
        return Record.from_dict(data), None
    except FieldError as e:
        return None, str(e)


def write_record_atomic(path: str | os.PathLike, record: Record) -> Path:
    """Write ``record`` as JSON to ``path`` via a temporary file in the same folder and ``os.replace``.

    Readers see the old file, no file, or the complete new one (also on Ctrl-C); the file gets the umask's mode.
    Missing parent folders are created. An invalid record is refused (ValueError) and nothing is written.
    """
    data = record.to_dict() if isinstance(record, Record) else record
    problems = validate_record(data)
    if problems:
        raise ValueError("refusing to write an invalid record: " + "; ".join(problems))
    return atomic_write_json(path, data)


def check_writable_output(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot receive a record (None if it can). Creates and writes nothing."""
    path = Path(path)
    why = output_path_problem(path)
    if why == "is a directory":
        return f"--output {path} is a directory; give a file name such as {path / 'result.json'}"
    return f"cannot write --output {path}: {why}" if why else None


def load_record(path: str | os.PathLike) -> tuple[Record | None, str | None]:
    """(record, None) for a valid record file, else (None, reason)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable JSON ({e.__class__.__name__}: {e})"
    rec, why = parse_record(data)
    return (rec.replace(path=str(path)), None) if rec is not None else (None, why)


def load_records(folder: str | os.PathLike, *, warn=None) -> list[Record]:
    """Every valid record under ``folder`` (recursively, hidden files and folders left out); every other JSON file
    is skipped with a warning naming it and the first problem (unreadable, foreign, or a field of the wrong type)."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    out = []
    for p in sorted(Path(folder).rglob("*.json")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):  # temp files, probe folders
            continue
        rec, why = load_record(p)
        if rec is None:
            warn(f"skipping {p}: {why}")
            continue
        out.append(rec)
    return out


def record_status(path: str | os.PathLike) -> str:
    """Status of the record at ``path``: one of STATUSES, 'missing' or 'invalid'."""
    if not Path(path).exists():
        return "missing"
    rec, _ = load_record(path)
    return "invalid" if rec is None else rec.status
