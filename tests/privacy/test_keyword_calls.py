"""A trainable layer called with keyword arguments only (``lin(input=x)``): the engine's own one-line error naming
the layer, eager and compiled (the taps read a layer's input from its positional arguments)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memory_test.privacy import MODES, PrivacyConfigError
from tests.conftest import make_private

SINGLE_PROCESS_MODES = sorted(name for name, m in MODES.items() if not m.distributed)


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(input=x)


def criterion(pred, target):
    return (pred - target).pow(2).sum(1)


criterion.reduction = "mean"


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_keyword_only_call_is_refused_naming_the_layer(mode, compiled):
    torch._dynamo.reset()
    dp_model, *_ = make_private(KeywordCall().double(), mode, criterion=criterion, n=4)
    if compiled:
        dp_model.compile(backend="aot_eager", fullgraph=True)
    with pytest.raises(PrivacyConfigError, match=r"lin\b.*keyword arguments only.*Call it as layer\(x\)") as caught:
        dp_model(torch.randn(4, 3, dtype=torch.float64))
    assert "\n" not in str(caught.value)
    torch._dynamo.reset()
