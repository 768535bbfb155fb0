"""The scripts' shared argument types and GPU check: bad values end in one argparse line, not a traceback later."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from memory_test.cli_common.arg_types import names_from, non_negative_int, positive_int
from memory_test.cli_common.devices import require_cuda
from memory_test.cli_common.errors import EXIT_BAD_INPUT, ToolError
from tests.conftest import REPO


@pytest.mark.parametrize(("kind", "text", "says"), [
    (positive_int, "0", "must be a positive integer, got 0"),
    (positive_int, "-3", "must be a positive integer, got -3"),
    (positive_int, "abc", "must be a positive integer, got 'abc'"),
    (non_negative_int, "-1", "must be an integer >= 0, got -1"),
    (names_from(lambda: ["vanilla", "ghost"], "mode"), "ghost,foo", "unknown mode ['foo']; choose from vanilla, ghost"),
    (names_from(["vanilla"], "mode"), ",", "unknown mode ','; choose from vanilla"),
])  # fmt: skip
def test_bad_values_say_what_is_valid(kind, text, says):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        kind(text)
    assert str(err.value) == says


def test_good_values_pass():
    assert positive_int("4") == 4 and non_negative_int("0") == 0
    assert names_from(["vanilla", "ghost"], "mode")("ghost, vanilla") == ["ghost", "vanilla"]


def test_gpu_scripts_say_they_need_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ToolError) as err:
        require_cuda("profile_modes.py")
    assert "profile_modes.py measures on a CUDA GPU and none is available" in err.value.what
    assert "GPU box" in err.value.fix


@pytest.mark.parametrize("content", [None, "{not json", '{"foo": 1}'])
def test_compile_table_names_the_file_it_cannot_read(tmp_path, content):
    path = tmp_path / "check.json"
    if content is not None:
        path.write_text(content)
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_table.py"), str(path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == EXIT_BAD_INPUT and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"compile_table.py: error: {path} ") and len(run.stderr.splitlines()) == 1
