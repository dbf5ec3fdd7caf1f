"""Repository-wide pytest set-up, also for `pytest --nbval` on notebooks/.

The notebook kernels inherit this environment: fast mode, CPU, two threads — the same settings
scripts/run_notebooks.py uses when it stores the outputs nbval compares against.
"""
import os

for key, value in {
    "DMN_MODE": "fast",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "PYTHONHASHSEED": "0",
    "TQDM_MININTERVAL": "1000",
    # kernels draw inline, as when the outputs were stored (unit tests switch to Agg themselves)
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
}.items():
    os.environ.setdefault(key, value)
