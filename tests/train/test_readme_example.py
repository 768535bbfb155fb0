"""README's "The same in Python" example runs as written, for 3 steps, in every mode (CPU, DiT-tiny, tiny latents).

Only the machine-specific values are substituted (device, model size, epochs, file path); the training loop itself
— including the plain ``optimizer.zero_grad()`` — is executed verbatim.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memory_test.diffusion.latent_dataset import FORMAT
from memory_test.privacy import MODES

README = Path(__file__).resolve().parents[2] / "README.md"
MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("### 3. The same in Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _latents(path: Path, n: int = 16) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {"latents": torch.randn(n, 4, 8, 8, generator=gen), "labels": torch.randint(0, 3, (n,), generator=gen)}
    metadata = {"format": FORMAT, "classes": json.dumps(["a", "b", "c"]), "image_size": "64"}
    save_file(tensors, str(path), metadata=metadata)
    return path


SUBSTITUTIONS = [  # (as written in README, on this CPU test machine)
    ('device, K, epochs, delta = "cuda", 4, 10, 1e-6', 'device, K, epochs, delta = "cpu", 2, 3, 1e-6'),
    ('model_name="DiT-XL/2"', 'model_name="DiT-tiny"'),
    ('LatentDataset("latents.safetensors")', "LatentDataset(LATENTS)"),
    ('grad_sample_mode="flash_bk"', "grad_sample_mode=MODE"),
]


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_readme_python_example_runs_three_steps(mode, tmp_path, capsys):
    code = readme_example()
    for written, here in SUBSTITUTIONS:
        assert written in code, f"README example changed: {written!r} not found"
        code = code.replace(written, here)
    namespace = {"LATENTS": str(_latents(tmp_path / "latents.safetensors")), "MODE": mode}
    exec(compile(code, "README.md example", "exec"), namespace)  # noqa: S102
    epochs = re.findall(r"epoch (\d+): ε = ([\d.]+)", capsys.readouterr().out)
    assert [e for e, _ in epochs] == ["1", "2", "3"]  # one logical batch per epoch (1024 > 16 images): 3 steps
    assert 0 < float(epochs[0][1]) < float(epochs[-1][1]) <= 8.0
