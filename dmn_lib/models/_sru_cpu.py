"""The fused SRU recurrence on the CPU: a small C++ op (_sru_cpu.cpp), compiled once per environment.

Backend "cpp" of `_sru_fused.py` (see there for what it computes; notebook 03 teaches the maths).
torch.utils.cpp_extension builds it with the same g++ and ninja the `sru` package needs, into the
environment's extension cache (`dmn_lib._sru_package.extensions_dir`), the first time an SRU runs
on the CPU or at `make setup` (about 30 s, once); later processes load the built library in well
under a second. If it cannot be built, `load_problem()` says why and how to fix it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_sru_cpu.cpp")
_problem: str | None = None
_loaded = False


def load_problem() -> str | None:
    """Build or load the op; None when it is ready, else a message naming the problem and the fix."""
    global _loaded, _problem
    if _loaded or _problem is not None:
        return _problem
    from dmn_lib._sru_package import extensions_dir

    extensions_dir()
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # parallel over the batch (torch's threads)
    ext_logger = logging.getLogger("torch.utils.cpp_extension")
    old_level = ext_logger.level
    ext_logger.setLevel(logging.ERROR)  # "No CUDA runtime is found" (logged at import): irrelevant to a CPU op
    try:
        from torch.utils.cpp_extension import load

        load(name="dmn_sru_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", *openmp], extra_ldflags=openmp,
             is_python_module=False, verbose=False)
        _loaded = True
    except Exception as err:  # a compiler problem: say which, and how to get past it
        _problem = (
            "Could not build dmn_lib's C++ SRU op (dmn_lib/models/_sru_cpu.cpp), which needs a C++ compiler "
            "(g++) and ninja, like the `sru` package: install them (Debian/Ubuntu: `apt-get install g++ "
            "ninja-build`; conda: `conda install gxx ninja`) and rerun `make setup`. Error: "
            + " ".join(str(err).split())[:500]
        )
    finally:
        ext_logger.setLevel(old_level)
    return _problem


def _common(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32  # the op computes in fp32 or fp64


def forward(U, x, weight_c, bias, c0, activation: int):
    k = U.shape[-1] // c0.shape[-1]
    dtype = _common(U, c0) if k == 4 else _common(U, x, c0)
    skip = x.to(dtype).contiguous() if k == 3 else U.new_empty(0, dtype=dtype)
    h, cells = torch.ops.dmn_sru.forward(U.to(dtype).contiguous(), skip, weight_c.to(dtype), bias.to(dtype),
                                         c0.to(dtype), activation)
    out_dtype = U.dtype if k == 4 else torch.promote_types(U.dtype, x.dtype)
    return h.to(out_dtype), cells


def backward(U, x, weight_c, bias, cells, grad_h, grad_c, activation: int):
    dtype = cells.dtype
    k = U.shape[-1] // cells.shape[-1]
    skip = x.to(dtype).contiguous() if k == 3 else U.new_empty(0, dtype=dtype)
    grad_U, grad_x, grad_wc_rows, grad_bias_rows, grad_c0 = torch.ops.dmn_sru.backward(
        U.to(dtype).contiguous(), skip, weight_c.to(dtype), bias.to(dtype), cells, grad_h.to(dtype),
        grad_c.to(dtype), activation
    )
    return (grad_U.to(U.dtype), grad_x.to(x.dtype) if k == 3 else None, grad_wc_rows, grad_bias_rows,
            grad_c0.to(cells.dtype))
