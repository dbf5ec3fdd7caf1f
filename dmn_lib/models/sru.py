"""The Simple Recurrent Unit (SRU, Lei et al. 2017) written out from scratch: paper §3.3, eq. 2-6.

Taught in notebook 03, where it is built line by line, checked against the `sru` package and
compared with an LSTM. This Python loop over t exists to be read, and `copy_from_package` proves it
computes the package's function. Training (`DMNConfig.rnn = "sru"`) uses `FusedSRU`: the package's
parameters, state dict and initialisation, with the same eq. 5-6 fused into one kernel per layer
(`kernel=`: "triton" on a GPU, "cpp" on the CPU; `dmn_lib/models/_sru_fused.py`), so neither the
package nor its CUDA build is needed to train.

One layer, for inputs x_1..x_T, as the `sru` package 2.x computes it (docs/design.md, §1):

    U = x W                                 all matrix products at once, for every t   (eq. 2-4)
    f_t = σ(U_f + v_f ⊙ c_{t-1} + b_f)      forget gate: eq. 3 + the package's v_f ⊙ c_{t-1}
    r_t = σ(U_r + v_r ⊙ c_{t-1} + b_r)      reset (highway) gate: eq. 4 + the package's v_r ⊙ c_{t-1}
    c_t = f_t ⊙ c_{t-1} + (1 - f_t) ⊙ x̃_t   the only sequential step: element-wise      (eq. 5)
    h_t = r_t ⊙ g(c_t) + (1 - r_t) ⊙ x'_t   highway to the input                        (eq. 6)

The paper's eq. 3-4 have no c_{t-1} term: f_t = σ(W_f x_t + b_f), r_t = σ(W_r x_t + b_r) (the first
SRU paper's form). `gates="paper"` gives exactly that: v_f = v_r = 0, fixed (a buffer, not learned);
`copy_from_package` then copies the package's W and b and leaves v at 0.

x̃_t = U_c (the candidate), and x'_t = x_t when the input and hidden sizes match, otherwise a
fourth projection U_s. The recurrence is element-wise, so it is cheap: that is why SRUs train
faster than LSTMs (the paper's Fig. 7). The paper's text picks g = sigmoid; the package's
default is the identity and the original DMN code used tanh, so g is an option here.

`kernel` picks who runs eq. 5-6, never what they compute: "python" (the loop below, the default of
`SRU`), "triton", "cpp", or "auto" (triton on CUDA tensors, cpp on CPU ones; the default of
`FusedSRU`). The fused kernels equal the package to 1e-5, gradients included (tests/test_sru_kernels.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dmn_lib.models._sru_fused import check_kernel, fused_recurrence, resolve_kernel

ACTIVATIONS = {"identity": lambda c: c, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
GATES = ("package", "paper")  # eq. 3-4 with the package's v ⊙ c_(t-1), or as the paper writes them


class SRULayer(nn.Module):
    """One SRU layer with the `sru` package's parameter layout (so weights can be copied).

    weight   (input_size, hidden_size * k): columns interleaved per unit j as
             [candidate_j, forget_j, reset_j(, skip_j)]; k = 4 adds the skip projection when
             input_size != hidden_size.
    weight_c (2 * hidden_size) = [v_f; v_r]     bias (2 * hidden_size) = [b_f; b_r]
    """

    def __init__(self, input_size: int, hidden_size: int, activation: str = "identity", kernel: str = "python",
                 gates: str = "package"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if gates not in GATES:
            raise ValueError(f"gates must be one of {GATES} (the package's eq. 3-4 with v ⊙ c_(t-1), or the "
                             f"paper's without), got {gates!r}")
        self.input_size, self.hidden_size, self.activation, self.gates = input_size, hidden_size, activation, gates
        self.kernel = check_kernel(kernel)
        self.k = 3 if input_size == hidden_size else 4
        self.weight = nn.Parameter(torch.empty(input_size, hidden_size * self.k))
        if gates == "package":
            self.weight_c = nn.Parameter(torch.empty(2 * hidden_size))
        else:  # the paper's eq. 3-4: no c_(t-1) in the gates, v = 0 for good
            self.register_buffer("weight_c", torch.zeros(2 * hidden_size))
        self.bias = nn.Parameter(torch.zeros(2 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The package's recipe: Var[W] = 1/input_size, weight_c uniform with unit variance * sqrt(.5).
        bound = math.sqrt(3.0 / self.input_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.gates == "package":
            nn.init.uniform_(self.weight_c, -math.sqrt(3.0), math.sqrt(3.0))
            self.weight_c.data.mul_(math.sqrt(0.5))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, c0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, B, input_size) -> h: (T, B, hidden_size), c_T: (B, hidden_size)."""
        length, batch, _ = x.shape
        d = self.hidden_size
        # eq. 2-4: one matrix product for all time steps — the parallel part of the SRU.
        U = (x @ self.weight).view(length, batch, d, self.k)
        kernel = resolve_kernel(self.kernel, x.device)  # "python" unless a fused kernel is asked for
        if kernel != "python":  # the same eq. 5-6 as below, fused into one kernel (_sru_fused.py)
            return fused_recurrence(U, x, self.weight_c, self.bias, c0, self.activation, kernel)
        candidate, forget_in, reset_in = U[..., 0], U[..., 1], U[..., 2]
        skip = U[..., 3] if self.k == 4 else x  # x'_t of eq. 6
        v_f, v_r = self.weight_c.view(2, d)
        b_f, b_r = self.bias.view(2, d)
        g = ACTIVATIONS[self.activation]

        c = x.new_zeros(batch, d) if c0 is None else c0
        hs = []
        for t in range(length):  # eq. 5-6: the sequential part is only element-wise
            f = torch.sigmoid(forget_in[t] + v_f * c + b_f)
            r = torch.sigmoid(reset_in[t] + v_r * c + b_r)
            c = f * c + (1 - f) * candidate[t]
            hs.append(r * g(c) + (1 - r) * skip[t])
        return torch.stack(hs), c


class SRU(nn.Module):
    """A stack of `SRULayer`s: `SRU(input_size, hidden_size, num_layers)(x) -> (h, c)`.

    x (T, B, input_size); h (T, B, hidden_size) from the last layer; c (num_layers, B, hidden_size).
    Same call and return convention as `sru.SRU`.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, activation: str = "identity",
                 kernel: str = "python", gates: str = "package"):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.layers = nn.ModuleList(
            SRULayer(input_size if i == 0 else hidden_size, hidden_size, activation, kernel, gates)
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor, c0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        last_cells = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, None if c0 is None else c0[i])
            last_cells.append(c)
        return x, torch.stack(last_cells)


class PackageLayoutLayer(SRULayer):
    """An `SRULayer` stored as `sru.SRUCell` stores it (the layers of `FusedSRU`; notebook 03): same
    parameters, plus the package's `scale_x` buffer, its `output_size` name and its initialisation."""

    def __init__(self, input_size: int, hidden_size: int, activation: str = "identity", kernel: str = "auto"):
        super().__init__(input_size, hidden_size, activation, kernel)
        self.output_size = hidden_size
        # The package's highway rescaling constant. sru.SRU's default (rescale=False) never reads it
        # and neither do we: it is kept, equal to 1, so that state dicts load both ways unchanged.
        self.register_buffer("scale_x", torch.ones(1))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, activation={self.activation}, kernel={self.kernel}"

    def reset_parameters(self) -> None:
        super().reset_parameters()  # the same random draws, in the same order, as the package's
        with torch.no_grad():  # the package then scales the forget and reset columns by sqrt(1/2)
            self.weight.view(self.input_size, self.hidden_size, self.k)[..., 1:3].mul_(0.5**0.5)


class FusedSRU(nn.Module):
    """`DMNConfig.rnn = "sru"`: the `sru` package's SRU without the package (taught in notebook 03).

    Same parameters, state dict (`rnn_lst.{i}.weight / weight_c / bias / scale_x`) and initial
    weights as `sru.SRU(input_size, hidden_size, num_layers, use_tanh=...)`, so checkpoints load
    either way; the same function as `SRU`, whose eq. 5-6 each layer runs as one fused kernel
    (`kernel="auto"`: Triton on a GPU, a compiled C++ op on the CPU; see `_sru_fused.py`).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, activation: str = "identity",
                 kernel: str = "auto"):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.rnn_lst = nn.ModuleList(  # the package's name for the list of layers
            PackageLayoutLayer(input_size if i == 0 else hidden_size, hidden_size, activation, kernel)
            for i in range(num_layers)
        )

    @property
    def layers(self) -> nn.ModuleList:  # what SRU.forward and copy_from_package read
        return self.rnn_lst

    forward = SRU.forward


def copy_from_package(ours: SRU, theirs) -> SRU:
    """Copy an `sru.SRU`'s weights into our `SRU` so both compute the same function (with
    `gates="paper"`: the function of the package's SRU with its v ⊙ c_(t-1) weights set to 0).

    Refuses configurations whose maths differ from eq. 2-6 as written here (rescaled highway,
    projections, layer norm, bidirectional) instead of silently giving different outputs.
    """
    layers = list(theirs.rnn_lst)
    if len(layers) != len(ours.layers):
        raise ValueError(f"Layer count differs: ours {len(ours.layers)}, package {len(layers)}")
    for i, (mine, cell) in enumerate(zip(ours.layers, layers)):
        unsupported = {
            "bidirectional": cell.bidirectional,
            "projection_size": cell.projection_size,
            "layer_norm": cell.layer_norm is not None,
            "rescale": cell.rescale and float(cell.scale_x) != 1.0,
            "custom_m": cell.custom_m is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"Package layer {i} uses {bad}, which the from-scratch SRU does not implement")
        if not cell.has_skip_term:
            raise ValueError(f"Package layer {i} has no skip term (has_skip_term=False); eq. 6 needs it")
        package_g = "tanh" if cell.activation_type == 1 else "identity"
        if package_g != mine.activation:
            raise ValueError(f"Activation g differs in layer {i}: ours {mine.activation!r}, package {package_g!r}")
        if tuple(cell.weight.shape) != tuple(mine.weight.shape):
            raise ValueError(
                f"Layer {i} weight shape differs: ours {tuple(mine.weight.shape)}, package {tuple(cell.weight.shape)}"
            )
        with torch.no_grad():
            mine.weight.copy_(cell.weight)
            if mine.gates == "package":  # the paper's gates keep v = 0: ours = the package with v zeroed
                mine.weight_c.copy_(cell.weight_c)
            mine.bias.copy_(cell.bias)
    return ours
