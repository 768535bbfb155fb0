"""single_experiment.py's exit codes (the sweep's shell script reads them too)."""

EXIT_OK = 0
EXIT_ERROR = 1  # the run failed; an "error" record was written
EXIT_USAGE = 2  # bad input; nothing was written (argparse uses 2 as well)
EXIT_OOM = 3  # out of memory; an "oom" record was written
