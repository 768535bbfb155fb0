"""What torch.compile did in this process: graphs compiled, graph breaks, recompilations.

Read from Dynamo's own counters; a record stores the difference between two snapshots (``since``), e.g. compile
work during the timed steps, which must be none for the step times to exclude recompilation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class CompileStats:
    graphs: int  # FX graphs produced (one per frame without breaks; more when a frame breaks)
    graph_breaks: int  # graph breaks hit while tracing
    recompiles: int  # compilations of a frame that already had a compiled entry (a guard failed)

    def since(self, earlier: CompileStats) -> CompileStats:
        """What happened between ``earlier`` and this snapshot."""
        return CompileStats(*(getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self)))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_seen_metrics: list = []  # the compilation-metrics entries already counted (Dynamo's deque drops old ones)
_recompiles_counted = 0


def _count_recompiles() -> int:
    """Recompiles so far: each of Dynamo's compilation-metrics entries says why it recompiled, if it did.

    Dynamo keeps only its most recent entries (64 by default), so new entries are counted at every snapshot:
    exact as long as fewer than that many compilations happen between two calls of ``compile_stats``.
    """
    global _recompiles_counted
    from torch._dynamo.utils import get_compilation_metrics

    metrics = get_compilation_metrics()
    seen = {id(m) for m in _seen_metrics}
    _recompiles_counted += sum(1 for m in metrics if id(m) not in seen and getattr(m, "recompile_reason", None))
    _seen_metrics[:] = metrics  # kept alive, so their ids cannot be reused by new entries
    return _recompiles_counted


def compile_stats() -> CompileStats:
    """Totals since the process started (Dynamo's counters; ``torch._dynamo.reset()`` does not clear them)."""
    from torch._dynamo.utils import counters

    return CompileStats(
        graphs=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
        recompiles=_count_recompiles(),
    )
