"""DMN as a whole: the paper's sizes, shapes, ablation switches, padding, and input errors."""
import os
import subprocess
import sys

import pytest
import torch

from dmn_lib import DMN, DMNConfig, count_parameters
from dmn_lib.models.synthesis import location_map

VOCAB = 40


def _batch(batch=3, height=96, width=64, lengths=(5, 2, 1)):
    images = torch.randn(batch, 3, height, width)
    tokens = torch.randint(2, VOCAB, (batch, max(lengths)))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0  # right padding
    return images, tokens, torch.tensor(lengths)


@pytest.fixture(scope="module")
def paper_model():
    return DMN(DMNConfig.preset("paper", vocab_size=100))


def test_paper_parameter_counts_match_section_5_3(paper_model):
    """§5.3: LM SRU 9M vs LSTM 24M; SM mSRU 10.1M vs mLSTM 24.2M (within 1%)."""
    lstm = DMNConfig.preset("paper", vocab_size=100, rnn="lstm")
    from dmn_lib.models.language import LanguageModule
    from dmn_lib.models.synthesis import SynthesisModule

    lstm_lm = LanguageModule(lstm, filter_channels=2696)
    lstm_sm = SynthesisModule(lstm, visual_channels=2688, r_size=2000)
    counts = {
        "LM SRU": (count_parameters(paper_model.language.rnn), 9.0e6),
        "LM LSTM": (count_parameters(lstm_lm.rnn), 24.0e6),
        "SM mSRU": (count_parameters(paper_model.synthesis.msru), 10.1e6),
        "SM mLSTM": (count_parameters(lstm_sm.msru), 24.2e6),
    }
    for name, (measured, paper) in counts.items():
        assert abs(measured - paper) / paper < 0.01, f"{name}: {measured} vs the paper's {paper}"


def test_paper_preset_shapes(paper_model):
    assert paper_model.visual.channels == [64, 336, 704, 1552, 2688]
    assert paper_model.visual.strides == [2, 4, 8, 16, 32]
    assert paper_model.language.r_size == 2000
    assert paper_model.language.filters.out_features == 10 * (2688 + 8)
    assert paper_model.synthesis.fusion.in_channels == 2688 + 10 + 8 + 2000 == 4706
    assert paper_model.synthesis.fusion.out_channels == 1000
    assert [c.out_channels for c in paper_model.upsampling.stages] == [512, 256, 128, 64, 32]


@pytest.mark.parametrize("preset", ["tiny", "course", "paper"])
def test_forward_backward_two_non_square_sizes(preset, paper_model):
    model = paper_model if preset == "paper" else DMN(DMNConfig.preset(preset, vocab_size=VOCAB))
    model.train()
    for height, width in [(96, 64), (72, 136)]:  # 72 and 136 are not multiples of 32
        images, tokens, lengths = _batch(2, height, width, lengths=(4, 2))
        logits, low = model(images, tokens, lengths, return_low_res=True)
        assert logits.shape == (2, 1, height, width)
        stride = model.config.stride
        assert low.shape[-2:] == model.visual(images)[-1].shape[-2:]
        assert abs(low.shape[-1] - width / stride) <= 1
        (logits.mean() + low.mean()).backward()
        assert all(p.grad is not None for p in model.language.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("rnn", ["sru", "sru_scratch", "lstm"])
@pytest.mark.parametrize("order", ["per_pixel", "flattened"])
def test_batch_with_mixed_lengths_equals_per_sample(rnn, order):
    model = DMN(DMNConfig.preset("tiny", vocab_size=VOCAB, rnn=rnn, msru_order=order)).eval()
    images, tokens, lengths = _batch(lengths=(6, 3, 1))
    with torch.no_grad():
        batched = model(images, tokens, lengths)
        alone = torch.cat([model(images[i : i + 1], tokens[i : i + 1, : lengths[i]], lengths[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("order", ["per_pixel", "flattened"])
def test_return_steps_ends_at_the_full_query(order):
    model = DMN(DMNConfig.preset("tiny", vocab_size=VOCAB, msru_order=order)).eval()
    images, tokens, lengths = _batch(lengths=(4, 2, 3))
    with torch.no_grad():
        logits, steps = model(images, tokens, lengths, return_steps=True)
    assert steps.shape == (3, 4, 1, 96, 64)
    torch.testing.assert_close(steps[torch.arange(3), lengths - 1], logits, atol=1e-5, rtol=1e-4)


def test_msru_runs_independently_at_every_pixel():
    """Changing M_t at one pixel changes R_N at that pixel only (per_pixel); not so when flattened."""
    torch.manual_seed(3)
    for order, isolated in [("per_pixel", True), ("flattened", False)]:
        sm = DMN(DMNConfig.preset("tiny", vocab_size=VOCAB, msru_order=order)).synthesis.eval()
        M = torch.randn(1, 3, sm.config.sm_channels, 4, 5)
        lengths = torch.tensor([3])
        out = sm._per_pixel(M)[:, -1] if order == "per_pixel" else sm._flattened(M, lengths)
        M2 = M.clone()
        M2[0, :, :, 1, 2] += 1.0
        out2 = sm._per_pixel(M2)[:, -1] if order == "per_pixel" else sm._flattened(M2, lengths)
        changed = (out2 - out).abs().amax(dim=(0, 1)) > 1e-6  # H' x W'
        assert changed[1, 2]
        assert (changed.sum() == 1) == isolated


def test_fusion_by_parts_equals_conv_of_the_concatenation():
    """eq. 9 is computed part by part; it must equal Conv1x1([I_N, F_t, LOC, r_t])."""
    model = DMN(DMNConfig.preset("tiny", vocab_size=VOCAB)).eval()
    images, tokens, lengths = _batch(lengths=(3, 3, 3))
    with torch.no_grad():
        visual = model.visual(images)[-1]
        r, filters = model.language(tokens)
        M = model.synthesis.fuse(visual, r, filters)
        b, _, h, w = visual.shape
        loc = location_map(h, w).expand(b, -1, -1, -1)
        i_loc = torch.cat([visual, loc], 1)
        for t in range(tokens.shape[1]):
            responses = torch.einsum("bkc,bchw->bkhw", filters[:, t], i_loc)
            words = r[:, t, :, None, None].expand(-1, -1, h, w)
            explicit = model.synthesis.fusion(torch.cat([visual, responses, loc, words], 1))
            torch.testing.assert_close(M[:, t], explicit, atol=1e-5, rtol=1e-4)


def test_location_map_channels():
    loc = location_map(2, 4)
    assert loc.shape == (8, 2, 4)
    torch.testing.assert_close(loc[:, 0, 0], torch.tensor([-1.0, -1.0, -0.5, 0.0, -0.75, -0.5, 0.25, 0.5]))
    torch.testing.assert_close(loc[:, 1, 3], torch.tensor([0.5, 0.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.5]))


# --- ablation switches: each removes exactly the part it names -----------------------------------
def _params(**switches):
    return DMN(DMNConfig.preset("tiny", vocab_size=VOCAB, **switches))


def test_only_vm_ignores_the_query():
    model = _params(use_language=False).eval()
    assert model.language is None and model.synthesis.msru is None
    images, tokens, lengths = _batch()
    with torch.no_grad():
        a = model(images, tokens, lengths)
        b = model(images, torch.randint(2, VOCAB, tokens.shape), lengths)
        c = model(images)  # no query needed at all
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_ablation_switches_remove_exactly_their_part():
    cfg = DMNConfig.preset("tiny", vocab_size=VOCAB)
    full = _params()
    sm_out, hidden, emb, lm_h, k = cfg.sm_channels, cfg.msru_hidden, cfg.embedding_dim, cfg.lm_hidden, cfg.num_filters
    c_top = full.visual.channels[-1]
    n_full = count_parameters(full)

    # only h_t: r_t loses e_t in the filters' input and in M_t's fusion
    only_h = _params(concat_embeddings=False)
    assert only_h.language.r_size == lm_h
    assert n_full - count_parameters(only_h) == emb * k * (c_top + 8) + emb * sm_out

    # no skip connections: the UM's 3x3 convs no longer read I_n
    no_skip = _params(skip_connections=False)
    skip_weights = sum(9 * conv.out_channels * full.visual.channels[cfg.num_scales - 1 - i]
                       for i, conv in enumerate(full.upsampling.stages))
    assert n_full - count_parameters(no_skip) == skip_weights

    # no dynamic filters: no filter generator, no F_t in M_t
    no_filters = _params(dynamic_filters=False)
    assert no_filters.language.filters is None and no_filters.synthesis.parts["responses"] == 0
    assert n_full - count_parameters(no_filters) == (emb + lm_h + 1) * k * (c_top + 8) + k * sm_out

    # no concatenation of r_t: the filters stay, r_t leaves M_t
    no_rt = _params(concat_rt=False)
    assert no_rt.language.filters is not None and no_rt.synthesis.parts["words"] == 0
    assert n_full - count_parameters(no_rt) == (emb + lm_h) * sm_out

    # no LOC: 8 channels fewer in the filters and in M_t
    no_loc = _params(use_loc=False)
    assert no_loc.language.filter_channels == c_top
    assert n_full - count_parameters(no_loc) == (emb + lm_h + 1) * k * 8 + 8 * sm_out

    # only VM: no LM, no recurrence
    only_vm = _params(use_language=False)
    assert only_vm.language is None
    assert count_parameters(only_vm.synthesis) == (c_top + 8 + 1) * sm_out + (sm_out + 1) * hidden + hidden + 1
    for model in [only_h, no_skip, no_filters, no_rt, no_loc, only_vm]:
        images, tokens, lengths = _batch()
        assert model(images, tokens, lengths).shape == (3, 1, 96, 64)


# --- bad input ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return DMN(DMNConfig.preset("tiny", vocab_size=VOCAB)).eval()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i, t, l: (i[:, :1], t, l), "B x 3 x H x W"),
        (lambda i, t, l: ((i * 255).to(torch.uint8), t, l), "must be float"),
        (lambda i, t, l: (i[..., :20, :], t, l), "too small"),
        (lambda i, t, l: (i, t, torch.tensor([5, 0, 1])), "empty"),
        (lambda i, t, l: (i, t[:, :2], l), "exceed"),
        (lambda i, t, l: (i, t + VOCAB, l), "different vocabulary"),
        (lambda i, t, l: (i, t.float(), l), "torch.long"),
        (lambda i, t, l: (i, None, None), "pass tokens"),
    ],
    ids=["channels", "dtype", "too-small", "empty-query", "lengths", "vocab", "token-dtype", "no-query"],
)
def test_bad_inputs_are_named(tiny, change, message):
    images, tokens, lengths = change(*_batch())
    with pytest.raises(ValueError, match=message):
        tiny(images, tokens, lengths)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="Unknown preset"):
        DMNConfig.preset("huge")
    with pytest.raises(ValueError, match="rnn='gru'"):
        DMNConfig(rnn="gru")
    with pytest.raises(ValueError, match="sigmoid"):
        DMNConfig(rnn="sru", sru_activation="sigmoid")
    with pytest.raises(ValueError, match="um_channels has 2 entries"):
        DMNConfig(num_scales=5, um_channels=(4, 4))
    with pytest.raises(ValueError, match="Unknown DMNConfig fields"):
        DMNConfig.from_dict({**DMNConfig().to_dict(), "dropout": 0.1})
    assert DMNConfig.from_dict(DMNConfig.preset("course").to_dict()) == DMNConfig.preset("course")


def test_pretrained_without_network_says_how_to_supply_weights():
    code = (
        "from dmn_lib import DMNConfig\nfrom dmn_lib.models.visual import create_backbone\n"
        "create_backbone(DMNConfig.preset('tiny', pretrained=True))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # what a machine without network sees, without waiting
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "pretrained_file" in result.stderr and "no network" in result.stderr


def test_pretrained_file_loads_local_weights(tmp_path):
    import timm

    cfg = DMNConfig.preset("tiny", vocab_size=VOCAB)
    full = timm.create_model(cfg.backbone, pretrained=False, **cfg.backbone_kwargs)
    path = tmp_path / "backbone.pth"
    torch.save(full.state_dict(), path)
    model = DMN(cfg.replace(pretrained_file=str(path)))
    reference = full.state_dict()
    loaded = model.visual.backbone.state_dict()
    # features_only flattens module names: "features.conv1_1" becomes "features_conv1_1"
    assert all(torch.equal(v, reference[k.replace("features_", "features.", 1)]) for k, v in loaded.items())
    with pytest.raises(FileNotFoundError, match="Backbone weights file not found"):
        DMN(cfg.replace(pretrained_file=str(tmp_path / "missing.pth")))
    # weights of another network: refused, not silently ignored (timm loads features non-strictly)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(RuntimeError, match="does not hold the weights"):
        DMN(cfg.replace(pretrained_file=str(other)))


def test_trim_backbone_drops_unused_blocks_and_keeps_the_features():
    """EfficientNet's feature extractor runs every block; trimming drops the ones after I_N, same outputs."""
    config = DMNConfig.preset("course", vocab_size=VOCAB, trim_backbone=False)  # EfficientNet-Lite0
    torch.manual_seed(0)
    full = DMN(config).visual.eval()
    torch.manual_seed(0)
    trimmed = DMN(config.replace(trim_backbone=True)).visual.eval()
    assert len(trimmed.backbone.blocks) < len(full.backbone.blocks)
    assert count_parameters(trimmed) < count_parameters(full)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(full(images), trimmed(images)):
            torch.testing.assert_close(a, b)
    dpn = DMN(DMNConfig.preset("tiny", vocab_size=VOCAB, trim_backbone=True)).visual  # nothing to drop there
    assert dpn.channels == DMN(DMNConfig.preset("tiny", vocab_size=VOCAB)).visual.channels


def test_frozen_blocks_keep_their_weights_and_statistics():
    config = DMNConfig.preset("course", vocab_size=VOCAB)  # EfficientNet-Lite0, trimmed, 2 blocks frozen
    model = DMN(config).train()
    frozen = model.visual.frozen
    assert len(frozen) == 4 and all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for m in frozen) and model.visual.backbone.blocks[2].training
    before = {k: v.clone() for k, v in model.visual.backbone.bn1.state_dict().items()}
    tokens = torch.randint(2, VOCAB, (2, 3))
    model(torch.randn(2, 3, 64, 64), tokens, torch.tensor([3, 2])).mean().backward()
    for k, v in model.visual.backbone.bn1.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched in training mode
    assert all(p.grad is not None for p in model.visual.backbone.blocks[2].parameters())  # the rest trains
    with pytest.raises(ValueError, match="frozen_blocks=2 needs an EfficientNet-like backbone"):
        DMN(DMNConfig.preset("tiny", vocab_size=VOCAB, frozen_blocks=2))
