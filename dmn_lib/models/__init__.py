"""DMN's modules, one file per section of the paper's §3 (see dmn.py for the whole network)."""
from dmn_lib.models.dmn import DMN

__all__ = ["DMN"]
