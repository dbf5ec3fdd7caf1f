"""`python -m dmn_lib.setup_check`: compile the `sru` op once and report the environment.

Run by ``make setup``; notebook 00 calls :func:`report` too.
"""
from __future__ import annotations

import platform
import time


def report() -> dict:
    import timm
    import torch

    from dmn_lib._sru_package import extensions_dir, import_sru

    start = time.perf_counter()
    sru = import_sru()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "sru": getattr(sru, "__version__", "?"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "sru_import_s": round(time.perf_counter() - start, 1),
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
