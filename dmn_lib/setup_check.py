"""`python -m dmn_lib.setup_check`: compile the course's small C++ ops once and report the environment.

Run by ``make setup``; notebook 12, §1 calls :func:`report` too. Two ops are compiled, once per
environment: the `sru` package's (notebook 03 compares our SRU with the package) and dmn_lib's fused
SRU recurrence for the CPU (`dmn_lib/models/_sru_cpu.cpp`, what `DMNConfig.rnn = "sru"` trains with).
"""
from __future__ import annotations

import platform
import time


def report() -> dict:
    import timm
    import torch

    from dmn_lib._sru_package import extensions_dir, import_sru
    from dmn_lib.models import _sru_cpu
    from dmn_lib.models._sru_fused import resolve_kernel

    start = time.perf_counter()
    sru = import_sru()
    sru_seconds = time.perf_counter() - start
    start = time.perf_counter()
    problem = _sru_cpu.load_problem()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "sru": getattr(sru, "__version__", "?"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "sru_import_s": round(sru_seconds, 1),
        "fused_sru_cpu_op": "ready" if problem is None else problem,
        "fused_sru_build_s": round(time.perf_counter() - start, 1),
        "sru_kernel": resolve_kernel("auto", device),  # what DMNConfig.rnn="sru" runs on this device
        "extensions_dir": extensions_dir(),
    }
    return info


def main() -> None:
    info = report()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
