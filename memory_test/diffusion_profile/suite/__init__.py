"""The profiling suite behind single_experiment.py and run_all_experiments.sh.

- ``flags``: every flag of single_experiment, once (parser, value rules, argv of a config, the sweep's flags);
  ``validate``: flags -> the typed ``RunConfig``; ``distributed_rules``: processes and devices.
- ``experiments``: the registry (vanilla, upstream Opacus baselines, every engine mode); ``train_step``: the step
  they share; ``measure``: one measured run, stage by stage; ``privacy_block``: ε for the record.
- ``run``: a run's outcome as a record; ``max_batch``: --find-max-batch; ``launch``/``worker``: torchrun runs.
- ``plan``: the sweep's plan for the shell script; ``resume``: what the sweep does with a configuration whose
  record may exist (standard library only, like ``exit_codes``).
- ``cli``: single_experiment's work, called by the entry point.

Imports run one way: entry points -> suite -> {privacy, models, diffusion, profiling, records}; nothing here
imports an entry point (tests/test_layout.py checks it).
"""
