"""What every command-line tool of memory_test shares (standard library only but ``devices``; imports nothing else
from memory_test).

- ``errors``: one line ``<tool>: error: <what> — <what to do>`` and an exit code for bad input, never a traceback
  unless ``MEMORY_TEST_DEBUG=1``.
- ``files``: atomic writes whose files get the umask's mode, and output-path checks without side effects.
- ``folder_lock``: the sweep's lock on its output folder (flock: the kernel drops it with its last holder).
- ``child_of``: run a command that dies with its parent (the sweep), even when the parent is SIGKILLed.
- ``devices``: ``--device auto|cpu|cuda|cuda:N`` to a torch device (imports torch when called).

Tools import this package; it never imports them, so it can move as a unit.
"""
