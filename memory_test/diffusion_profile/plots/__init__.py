"""Charts and summary.md from a folder of records (never imports torch: pandas and matplotlib only).

- ``tables``: typed records -> one pandas row per run or search, ratios to vanilla, max batch, markdown.
- ``style``: what every chart shares (titles, colours, units, the CPU caveat, saving).
- one file per chart family: ``breakdown``, ``batch_curves`` (peak, time and throughput, trade-off), ``ratio``,
  ``max_batch``, ``noise_multiplicity``, ``scaling``.
- ``summary``: summary.md's sections (noisy runs marked); ``draw``: every chart and the summary for a folder.
"""
