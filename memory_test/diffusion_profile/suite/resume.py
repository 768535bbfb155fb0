"""What the sweep does with one configuration, from the records already in its folder (standard library only: the
shell script asks once per configuration, so this must start fast).

    python -m memory_test.diffusion_profile.suite.resume RECORD BATCH USE_BRACKET

prints one of ``kept <status>`` (a finished record is there), ``skip <batch>`` (a smaller batch of the same
configuration ran out of memory), ``run`` or ``run OK,OOM`` (a max-batch search that may bisect between the
largest batch that ran and the smallest that ran out of memory). The other batches of a configuration are the
records in the same folder whose names differ only in their batch part (``__bs<B>__``; ``plan.record_name``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from memory_test.records.io import record_status

FINISHED = ("ok", "oom", "skipped")  # a sweep does not rerun these; "error" records are retried
BATCH_PART = "__bs{}__"  # where a record's name holds its batch size ("max" for a max-batch search)


def grid_records(record: str) -> dict[int, Path]:
    """The records of the same configuration at other batch sizes, by batch size."""
    path = Path(record)
    m = re.match(r"(?P<head>.*?)__bs[^_]+__(?P<tail>.*)$", path.name)
    if m is None:
        return {}
    head, tail = m["head"], m["tail"]
    found = {}
    for other in path.parent.glob(f"{head}__bs*__{tail}"):
        batch = other.name[len(head) + len("__bs") :].split("__", 1)[0]
        if batch.isdigit() and other.name == f"{head}{BATCH_PART.format(batch)}{tail}":
            found[int(batch)] = other
    return found


def decide(record: str, batch: str, use_bracket: bool) -> str:
    status = record_status(record)
    if status in FINISHED:
        return f"kept {status}"
    grid_status = {b: record_status(path) for b, path in grid_records(record).items()}
    oom = [b for b, st in grid_status.items() if st == "oom"]
    if batch != "max":
        smaller = [b for b in oom if b < int(batch)]
        return f"skip {min(smaller)}" if smaller else "run"
    ok = [b for b, st in grid_status.items() if st == "ok"]
    if use_bracket and ok and oom and min(oom) > max(ok):
        return f"run {max(ok)},{min(oom)}"
    return "run"


def main(argv: list[str]) -> int:
    record, batch, use_bracket = argv
    print(decide(record, batch, use_bracket == "1"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
