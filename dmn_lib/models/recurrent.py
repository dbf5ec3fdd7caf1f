"""The three recurrent nets DMN can use, behind one call: `make_rnn(kind, ...)`.

`DMNConfig.rnn` picks: "sru" (the default: `FusedSRU`, the `sru` package's parameters and state
dict with eq. 5-6 fused into one kernel per layer, Triton on a GPU and C++ on the CPU; the package
itself is never imported), "sru_scratch" (our eq. 2-6 as the readable Python loop,
`dmn_lib.models.sru.SRU`) or "lstm" (`nn.LSTM`, the baseline of the paper's §5.3 / Fig. 7).
Taught in notebook 03; compared in notebook 10.

Every returned module maps x (T, B, input_size) -> h (T, B, hidden_size), the last layer's
output at every step. All three are causal, so right padding never changes the outputs at real
words: DMN reads each sample's output at its last real word.
"""
from __future__ import annotations

import torch
from torch import nn

from dmn_lib.models.sru import SRU as ScratchSRU
from dmn_lib.models.sru import FusedSRU


class Recurrent(nn.Module):
    """A thin wrapper so the three kinds share `forward(x) -> h` and one attribute, `.net`."""

    def __init__(self, kind: str, input_size: int, hidden_size: int, num_layers: int, activation: str = "identity"):
        super().__init__()
        self.kind = kind
        if kind == "sru":  # state dict = sru.SRU(input_size, hidden_size, num_layers, use_tanh=...)'s
            self.net = FusedSRU(input_size, hidden_size, num_layers=num_layers, activation=activation)
        elif kind == "sru_scratch":
            self.net = ScratchSRU(input_size, hidden_size, num_layers=num_layers, activation=activation)
        elif kind == "lstm":
            self.net = nn.LSTM(input_size, hidden_size, num_layers=num_layers)
        else:
            raise ValueError(f"Unknown rnn kind {kind!r}; choose 'sru', 'sru_scratch' or 'lstm'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def make_rnn(kind: str, input_size: int, hidden_size: int, num_layers: int, activation: str = "identity") -> Recurrent:
    return Recurrent(kind, input_size, hidden_size, num_layers, activation)
