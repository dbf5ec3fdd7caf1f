"""The fused SRU recurrence in Triton: one program per block of (batch, hidden) columns, time loop inside.

Backend "triton" of `_sru_fused.py` (see there for what it computes; notebook 03 teaches the maths).
Replaces the `sru` package's CUDA kernel, whose build fails against recent torch: Triton ships with
torch's Linux CUDA wheels and needs no nvcc. Inputs may be fp32, bf16 or fp16; every sum and the
state c are float32. Under TRITON_INTERPRET=1 (read by Triton when this module is imported) the
same kernels run on CPU tensors in Triton's interpreter: that is how the CPU tests check them.
Only long-standing `tl` calls are used (program_id, arange, load/store with masks, sigmoid, where).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 128  # (batch, hidden) columns per program


@triton.jit
def _g(c, ACTIVATION: tl.constexpr):
    """g of eq. 6: 0 identity, 1 tanh (written with σ, available in every Triton), 2 sigmoid."""
    if ACTIVATION == 1:
        g = 2 * tl.sigmoid(2 * c) - 1
    elif ACTIVATION == 2:
        g = tl.sigmoid(c)
    else:
        g = c
    return g


@triton.jit
def _g_grad(g, ACTIVATION: tl.constexpr):
    """dg/dc, written from g itself."""
    if ACTIVATION == 1:
        out = 1 - g * g
    elif ACTIVATION == 2:
        out = g * (1 - g)
    else:
        out = g * 0 + 1
    return out


@triton.jit
def _gate_weights(WC, BIAS, j, mask, hidden):
    """v_f, v_r (weight_c = [v_f; v_r]) and b_f, b_r (bias = [b_f; b_r]) of units j, in float32."""
    v_f = tl.load(WC + j, mask=mask, other=0.0).to(tl.float32)
    v_r = tl.load(WC + hidden + j, mask=mask, other=0.0).to(tl.float32)
    b_f = tl.load(BIAS + j, mask=mask, other=0.0).to(tl.float32)
    b_r = tl.load(BIAS + hidden + j, mask=mask, other=0.0).to(tl.float32)
    return v_f, v_r, b_f, b_r


@triton.jit
def _step(U, X, row, c_prev, v_f, v_r, b_f, b_r, mask, K: tl.constexpr):
    """Step t's candidate x̃_t, gates f_t (eq. 3) and r_t (eq. 4), and skip term x'_t, in float32."""
    u = U + row * K
    cand = tl.load(u, mask=mask, other=0.0).to(tl.float32)
    f = tl.sigmoid(tl.load(u + 1, mask=mask, other=0.0).to(tl.float32) + v_f * c_prev + b_f)
    r = tl.sigmoid(tl.load(u + 2, mask=mask, other=0.0).to(tl.float32) + v_r * c_prev + b_r)
    if K == 4:
        skip = tl.load(u + 3, mask=mask, other=0.0).to(tl.float32)
    else:
        skip = tl.load(X + row, mask=mask, other=0.0).to(tl.float32)
    return cand, f, r, skip


@triton.jit
def _sru_forward_kernel(U, X, WC, BIAS, H, CELLS, length, columns, hidden,
                        K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    # Column n = b * hidden + j of the (B, d) state; rows of U, X, H, CELLS are t * columns + n.
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < columns
    j = n % hidden
    v_f, v_r, b_f, b_r = _gate_weights(WC, BIAS, j, mask, hidden)
    row = n.to(tl.int64)  # 64-bit offsets: L * B * d * k can pass 2^31 on a GPU
    c = tl.load(CELLS + row, mask=mask, other=0.0)  # cells[0] = c0
    for _ in range(length):
        cand, f, r, skip = _step(U, X, row, c, v_f, v_r, b_f, b_r, mask, K)
        c = cand + (c - cand) * f  # eq. 5
        h = skip + (_g(c, ACTIVATION) - skip) * r  # eq. 6
        tl.store(CELLS + row + columns, c, mask=mask)
        tl.store(H + row, h.to(H.dtype.element_ty), mask=mask)
        row += columns


@triton.jit
def _sru_backward_kernel(U, X, WC, BIAS, CELLS, GRAD_H, GRAD_C, GRAD_U, GRAD_X, GRAD_C0, GRAD_WC, GRAD_BIAS,
                         length, last_row, columns, hidden,
                         K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < columns
    j = n % hidden
    v_f, v_r, b_f, b_r = _gate_weights(WC, BIAS, j, mask, hidden)
    dc = tl.load(GRAD_C + n, mask=mask, other=0.0).to(tl.float32)  # dLoss/dc_t, carried back in time
    acc_vf = tl.zeros([BLOCK], dtype=tl.float32)
    acc_vr = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bf = tl.zeros([BLOCK], dtype=tl.float32)
    acc_br = tl.zeros([BLOCK], dtype=tl.float32)
    row = n.to(tl.int64) + last_row  # t = L - 1
    for _ in range(length):
        c_prev = tl.load(CELLS + row, mask=mask, other=0.0)
        c = tl.load(CELLS + row + columns, mask=mask, other=0.0)
        cand, f, r, skip = _step(U, X, row, c_prev, v_f, v_r, b_f, b_r, mask, K)  # recomputed, not stored
        g = _g(c, ACTIVATION)
        gh = tl.load(GRAD_H + row, mask=mask, other=0.0).to(tl.float32)
        # h_t = x'_t + (g(c_t) - x'_t) r_t
        g_reset = gh * (g - skip) * r * (1 - r)  # through σ of eq. 4
        g_skip = gh * (1 - r)
        g_c = dc + gh * r * _g_grad(g, ACTIVATION)
        # c_t = cand + (c_{t-1} - cand) f_t
        g_forget = g_c * (c_prev - cand) * f * (1 - f)  # through σ of eq. 3
        gu = GRAD_U + row * K
        tl.store(gu, (g_c * (1 - f)).to(GRAD_U.dtype.element_ty), mask=mask)
        tl.store(gu + 1, g_forget.to(GRAD_U.dtype.element_ty), mask=mask)
        tl.store(gu + 2, g_reset.to(GRAD_U.dtype.element_ty), mask=mask)
        if K == 4:
            tl.store(gu + 3, g_skip.to(GRAD_U.dtype.element_ty), mask=mask)
        else:
            tl.store(GRAD_X + row, g_skip.to(GRAD_X.dtype.element_ty), mask=mask)
        dc = g_c * f + g_forget * v_f + g_reset * v_r
        acc_vf += g_forget * c_prev
        acc_vr += g_reset * c_prev
        acc_bf += g_forget
        acc_br += g_reset
        row -= columns
    tl.store(GRAD_C0 + n, dc, mask=mask)
    # Per (b, j) sums over t, laid out (B, 2d) like [v_f; v_r] per batch row; the caller sums over b.
    b2 = (n // hidden) * 2 * hidden + j
    tl.store(GRAD_WC + b2, acc_vf, mask=mask)
    tl.store(GRAD_WC + b2 + hidden, acc_vr, mask=mask)
    tl.store(GRAD_BIAS + b2, acc_bf, mask=mask)
    tl.store(GRAD_BIAS + b2 + hidden, acc_br, mask=mask)


def compile_for(arch: int = 90, dtype: str = "fp32", k: int = 3, activation: int = 0) -> dict[str, str]:
    """Compile both kernels for a CUDA GPU of compute capability `arch` (90: H100/H200) without one:
    -> their PTX. Lets a CPU-only machine (CI) check that they compile, not only interpret."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"U": dtype, "X": dtype, "H": dtype, "GRAD_H": dtype, "GRAD_U": dtype, "GRAD_X": dtype}
    constants = {"K": k, "ACTIVATION": activation, "BLOCK": BLOCK}
    ptx = {}
    for kernel in (_sru_forward_kernel, _sru_backward_kernel):
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.isupper():  # pointers; the state and its gradients are float32
                signature[name] = "*" + pointers.get(name, "fp32")
            else:
                signature[name] = "i64" if name == "last_row" else "i32"
        source = ASTSource(kernel, signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        ptx[kernel.__name__] = compiled.asm["ptx"]
    return ptx


def interpreted() -> bool:
    """True when Triton's interpreter runs these kernels (TRITON_INTERPRET=1 at import): CPU tensors work."""
    return type(_sru_forward_kernel).__name__ == "InterpretedFunction"


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"The Triton SRU kernel takes float32, bfloat16 or float16 tensors, not {t.dtype}; "
                            "use kernel='cpp' (CPU) or 'python' for float64")


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (e.g. cuda:1)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(columns: int):
    return (triton.cdiv(columns, BLOCK),)


def forward(U, x, weight_c, bias, c0, activation: int):
    length, batch, dk = U.shape
    hidden = c0.shape[-1]
    k = dk // hidden
    _check(U, x, weight_c, bias)
    U, x = U.contiguous(), (x.contiguous() if k == 3 else x)
    cells = torch.empty(length + 1, batch, hidden, dtype=torch.float32, device=U.device)
    cells[0] = c0
    h = torch.empty(length, batch, hidden, device=U.device,
                    dtype=U.dtype if k == 4 else torch.promote_types(U.dtype, x.dtype))
    columns = batch * hidden
    if length > 0 and columns > 0:
        with _on(U.device):
            _sru_forward_kernel[_grid(columns)](U, x, weight_c, bias, h, cells, length, columns, hidden,
                                                K=k, ACTIVATION=activation, BLOCK=BLOCK)
    return h, cells


def backward(U, x, weight_c, bias, cells, grad_h, grad_c, activation: int):
    length, batch, dk = U.shape
    hidden = cells.shape[-1]
    k = dk // hidden
    U, x = U.contiguous(), (x.contiguous() if k == 3 else x)
    grad_U = torch.empty_like(U)
    grad_x = torch.empty_like(x) if k == 3 else None
    grad_c0 = torch.empty(batch, hidden, dtype=torch.float32, device=U.device)
    grad_wc_rows = torch.empty(batch, 2 * hidden, dtype=torch.float32, device=U.device)
    grad_bias_rows = torch.empty(batch, 2 * hidden, dtype=torch.float32, device=U.device)
    columns = batch * hidden
    if length > 0 and columns > 0:
        with _on(U.device):
            _sru_backward_kernel[_grid(columns)](
                U, x, weight_c, bias, cells, grad_h, grad_c, grad_U, grad_U if grad_x is None else grad_x, grad_c0,
                grad_wc_rows, grad_bias_rows, length, (length - 1) * columns, columns, hidden,
                K=k, ACTIVATION=activation, BLOCK=BLOCK,
            )
    else:
        grad_U.zero_(), grad_c0.copy_(grad_c), grad_wc_rows.zero_(), grad_bias_rows.zero_()
    return grad_U, grad_x, grad_wc_rows, grad_bias_rows, grad_c0
