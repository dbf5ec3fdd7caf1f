"""Importing the `sru` package (Lei et al., 2017) quietly and once per environment.

The package is the reference, not the training path: only the tests, notebook 03 (which
compares our SRU with it) and ``make setup`` import it. A DMN with `rnn="sru"` runs
`dmn_lib.models.sru.FusedSRU`, which has the package's state dict but never imports it.

`import sru` JIT-compiles a small C++ op (and, where CUDA is present, its CUDA kernel, whose
build fails against recent torch) with torch's cpp_extension. We point the build cache at the
active environment, so the ~25 s compile happens once per environment (``make setup`` does it;
dmn_lib's own CPU op, `dmn_lib/models/_sru_cpu.cpp`, is cached there too), and we silence the
package's known, harmless CPU-only messages — nothing else.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

_SRU = None

# Messages the sru package prints on a CPU-only machine that a student should not have to read.
_IMPORT_NOISE = (
    r"Just-in-time loading and compiling the CUDA kernels of SRU was unsuccessful",
    r"`torch\.jit\.script` is deprecated",
)
_CPU_GRAD_WARNING = r"Running SRU on CPU with grad_enabled=True"


def extensions_dir() -> str:
    """Where torch caches compiled ops for this environment (overridable by TORCH_EXTENSIONS_DIR):
    the `sru` package's and dmn_lib's fused SRU op for the CPU."""
    return os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "share", "dmn_lib", "torch_extensions")
    )


def import_sru():
    """Return the `sru` module, compiling its op on first use in this environment."""
    global _SRU
    if _SRU is not None:
        return _SRU
    import torch

    extensions_dir()
    ext_logger = logging.getLogger("torch.utils.cpp_extension")
    old_level = ext_logger.level
    if not torch.cuda.is_available():
        ext_logger.setLevel(logging.ERROR)  # "No CUDA runtime is found": expected on CPU
    try:
        with warnings.catch_warnings():
            for pattern in _IMPORT_NOISE:
                if "CUDA" in pattern and torch.cuda.is_available():
                    continue  # on a GPU machine a failed CUDA build must be seen
                warnings.filterwarnings("ignore", message=pattern)
            try:
                import sru
            except Exception as err:  # pragma: no cover - depends on the machine's compiler
                raise RuntimeError(
                    "Could not import the `sru` package: it compiles a small C++ op on first use and "
                    "needs a C++ compiler (g++) and ninja. Install them (Debian/Ubuntu: "
                    "`apt-get install g++ ninja-build`; conda: `conda install gxx ninja`) or use "
                    "rnn='sru_scratch' / 'lstm' in DMNConfig. Original error: " + repr(err)
                ) from err
    finally:
        ext_logger.setLevel(old_level)
    _SRU = sru
    return sru


@contextlib.contextmanager
def quiet_cpu_training():
    """The package warns on every CPU forward with gradients; training on CPU is what we mean to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CPU_GRAD_WARNING)
        yield
