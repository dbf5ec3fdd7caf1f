"""dmn_lib: the Dynamic Multimodal Network (Margffoy-Tuay et al., ECCV 2018) for a notebook course.

    from dmn_lib import DMN, DMNConfig
    model = DMN(DMNConfig.preset("course", vocab_size=len(vocab)))
    logits = model(images, tokens, lengths)        # B x 1 x H x W

A run is a named spec (`dmn_lib.spec`: tiny, fast, course, paper): model config, data and training.
Notebook 12, §2 maps every part of the library to the notebook that teaches it.
"""
from dmn_lib.config import DMNConfig
from dmn_lib.models.dmn import DMN

__version__ = "0.2.0"


def count_parameters(module) -> int:
    """Trainable parameters of a module (the paper's §5.3 counts: LM SRU 9.0M vs LSTM 24.0M). Notebook 00, §5."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["DMN", "DMNConfig", "count_parameters", "__version__"]
