"""The versioned JSON result record of the profiling suite, typed end to end (standard library only).

- ``fields``: the typed-block machinery: known fields checked on reading (an error names the field), unknown keys
  kept, ``to_dict``/``from_dict``.
- ``record``: the record and its blocks (``Record``, ``RunConfig``, ``Timing``, ``Memory``, ...); older schema
  versions are read into the current types (``docs/RESULTS_SCHEMA.md`` says what each version adds).
- ``timing``: step-time statistics; ``ranks``: one record's numbers from every rank of a multi-process run.
- ``io``: validation, atomic writes, loading a folder; ``python -m memory_test.records {status|validate} FILE...``.

Never imports torch, pandas or anything of memory_test but ``cli_common``: the visualizer and the sweep's shell
script read records without the training stack.
"""
