"""The SRU recurrence (paper §3.3, eq. 5-6) fused into one kernel call per layer, forward and backward.

Infrastructure, not course material: notebook 03 teaches the maths with the readable Python loop of
`dmn_lib.models.sru.SRULayer`. That loop runs ~10 small tensor operations per time step, each one
recorded by autograd; the kernels here do the whole loop over t in one pass (parallel over
batch x hidden, the time loop inside), and their backward is written out by hand. They compute eq.
5-6 exactly as the `sru` package 2.x does, with its v ⊙ c_{t-1} terms (not in the paper's eq. 3-4):

    f_t = σ(U_f,t + v_f ⊙ c_{t-1} + b_f)
    r_t = σ(U_r,t + v_r ⊙ c_{t-1} + b_r)
    c_t = U_c,t + (c_{t-1} - U_c,t) ⊙ f_t          (= f_t ⊙ c_{t-1} + (1 - f_t) ⊙ x̃_t, eq. 5)
    h_t = x'_t + (g(c_t) - x'_t) ⊙ r_t              (= r_t ⊙ g(c_t) + (1 - r_t) ⊙ x'_t, eq. 6)

with U = x W (L, B, d, k), x'_t = U_s,t when k = 4, else the layer's input x_t; g = identity, tanh
or sigmoid. The state c is kept in float32 whatever the input dtype (fp32, bf16, fp16).
tests/test_sru_kernels.py checks both backends against the `sru` package to 1e-5 (outputs and
the gradients of the input and of every weight).

Kernels (`kernel=` of `SRU` / `FusedSRU`):
  "python"  the loop of SRULayer (what notebook 03 teaches; autograd does the backward)
  "triton"  _sru_triton.py: Triton, for CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)
  "cpp"     _sru_cpu.py: a C++ op for CPU tensors, compiled once per environment
  "auto"    triton on CUDA tensors, cpp on CPU ones; where that one cannot run it warns once,
            saying why and how to fix it, and runs "python" (same function, slower)
"""
from __future__ import annotations

import warnings

import torch

KERNELS = ("python", "triton", "cpp", "auto")
ACTIVATION_CODES = {"identity": 0, "tanh": 1, "sigmoid": 2}  # g of eq. 6, as the kernels number it
_warned: set[str] = set()


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _fall_back(reason: str) -> str:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason} The SRU runs its Python loop instead: the same function, slower.",
                      RuntimeWarning, stacklevel=4)
    return "python"


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The kernel that will run on `device`: `kernel` itself, or for "auto" the fused one that can run.

    An explicit "triton" or "cpp" that cannot run raises an error that says why; "auto" falls
    back to "python" with a one-time warning instead.
    """
    if kernel == "python":
        return kernel
    if kernel == "auto":
        if device.type == "cuda":
            reason = _triton_problem(device)
            return "triton" if reason is None else _fall_back(reason)
        if device.type == "cpu":
            reason = _cpp_problem(device)
            return "cpp" if reason is None else _fall_back(reason)
        return "python"  # other accelerators (e.g. Apple's mps): no fused kernel
    check_kernel(kernel)
    reason = _triton_problem(device) if kernel == "triton" else _cpp_problem(device)
    if reason is not None:
        raise RuntimeError(reason)
    return kernel


def _triton_problem(device: torch.device) -> str | None:
    try:
        from dmn_lib.models import _sru_triton
    except ImportError as err:
        return (f"The Triton SRU kernel needs the `triton` package, which does not import here ({err}); "
                "`pip install triton` (it comes with torch's Linux CUDA wheels).")
    if device.type != "cuda" and not _sru_triton.interpreted():
        return ("The Triton SRU kernel runs on CUDA tensors; on the CPU it runs only in Triton's "
                "interpreter, for tests: set TRITON_INTERPRET=1 before Python starts, or use kernel='cpp'.")
    return None


def _cpp_problem(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"The C++ SRU kernel runs on CPU tensors, not {device.type}; use kernel='triton' or 'auto'."
    from dmn_lib.models import _sru_cpu

    return _sru_cpu.load_problem()


def _backend(kernel: str):
    if kernel == "triton":
        from dmn_lib.models import _sru_triton as backend
    else:
        from dmn_lib.models import _sru_cpu as backend
    return backend


class FusedRecurrence(torch.autograd.Function):
    """eq. 5-6 over all t for one layer: (U, x, weight_c, bias, c0) -> (h, c_T), backward by hand.

    The backend's forward returns h and every cell state (L + 1, B, d) in float32, cells[0] = c0;
    its backward walks t from L-1 down to 0 and returns the gradients of U, of x (only where x is
    the skip term, k = 3), of weight_c and bias summed per batch row, and of c0.
    """

    @staticmethod
    def forward(ctx, U, x, weight_c, bias, c0, activation: int, kernel: str):
        backend = _backend(kernel)
        h, cells = backend.forward(U, x, weight_c, bias, c0, activation)
        ctx.save_for_backward(U, x, weight_c, bias, cells)
        ctx.activation, ctx.kernel = activation, kernel
        return h, cells[-1].clone()

    @staticmethod
    def backward(ctx, grad_h, grad_c):
        U, x, weight_c, bias, cells = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros(cells.shape[0] - 1, *cells.shape[1:], dtype=cells.dtype, device=cells.device)
        if grad_c is None:
            grad_c = torch.zeros_like(cells[-1])
        grad_U, grad_x, grad_wc_rows, grad_bias_rows, grad_c0 = _backend(ctx.kernel).backward(
            U, x, weight_c, bias, cells, grad_h.contiguous(), grad_c.contiguous(), ctx.activation
        )
        # The per-row sums of the kernels, summed over the batch: deterministic, no atomics.
        grad_wc = grad_wc_rows.sum(0).to(weight_c.dtype)
        grad_bias = grad_bias_rows.sum(0).to(bias.dtype)
        return grad_U, grad_x, grad_wc, grad_bias, grad_c0, None, None


def fused_recurrence(U: torch.Tensor, x: torch.Tensor, weight_c: torch.Tensor, bias: torch.Tensor,
                     c0: torch.Tensor | None, activation: str, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One SRU layer's eq. 5-6 with a fused kernel ("triton" or "cpp"), as `SRULayer.forward` returns it.

    U (L, B, d, k) = x W; x (L, B, input_size) the layer's input (the skip term x'_t when k = 3);
    weight_c = [v_f; v_r], bias = [b_f; b_r] (2d); c0 (B, d) or None (zeros).
    Returns h (L, B, d), in the inputs' dtype, and c_T (B, d), float32 (float64 for float64 inputs).
    """
    length, batch, d, k = U.shape
    state_dtype = torch.float64 if U.dtype == torch.float64 else torch.float32
    if c0 is None:
        c0 = torch.zeros(batch, d, dtype=state_dtype, device=U.device)
    elif c0.shape != (batch, d):
        raise ValueError(f"c0 must be (batch, hidden) = {(batch, d)}, got {tuple(c0.shape)}")
    skip = x.contiguous() if k == 3 else x  # read by the kernel only when it is the skip term
    return FusedRecurrence.apply(U.reshape(length, batch, d * k), skip, weight_c.contiguous(), bias.contiguous(),
                                 c0.to(state_dtype).contiguous(), ACTIVATION_CODES[activation], kernel)
