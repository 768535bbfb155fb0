"""``python -m memory_test.records status FILE...`` (one status per line) or ``validate FILE...``."""

from __future__ import annotations

import sys

from memory_test.records.io import load_record, record_status


def main(argv: list[str]) -> int:
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
    print("usage: python -m memory_test.records {status|validate} FILE...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
