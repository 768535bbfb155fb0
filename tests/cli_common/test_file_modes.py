"""Records, checkpoints, latent files and metrics get the mode the umask gives, like any file the user writes
(not mkstemp's 0600, which hid results from the user's group)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from memory_test.cli_common.files import atomic_write_json
from memory_test.diffusion import latent_dataset as ld
from memory_test.records.io import write_record_atomic
from memory_test.train.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from tests.conftest import FIXTURE_RECORDS

FIXTURE = FIXTURE_RECORDS / "vanilla_bs8.json"


@pytest.fixture(params=[0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_files_follow_the_umask(umask, tmp_path):
    writers = {
        "record.json": lambda p: write_record_atomic(p, json.loads(FIXTURE.read_text())),
        "ckpt.pt": lambda p: save_checkpoint(p, {"format": CHECKPOINT_FORMAT}),
        "latents.safetensors": lambda p: ld._atomic_save({"latents": torch.zeros(2, 4, 1, 1)}, p, {"a": "b"}),
        "metrics.json": lambda p: atomic_write_json(p, {"epsilon": float("inf")}),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)  # no temp file left beside them
