"""`msru_order="flattened"` reproduces the original release's mSRU exactly (notebook 05, section 7).

The original (BCV-Uniandes/DMS, batch 1) builds ONE sequence per image, pixel-major: for each pixel in
raster order, its words in order; it runs the SRU along it and reads R_N from the last H'W' steps.
Tagging every entry of M with 100 * word + pixel makes both the order and the read-out visible.
"""
import types

import torch
from torch import nn

from dmn_lib import DMN, DMNConfig
from dmn_lib.models.synthesis import SynthesisModule, original_sequence_index


class Identity(nn.Module):
    """An "mSRU" that returns its input: the read-out then shows which step it took."""

    def forward(self, x):
        self.seen = x
        return x


def tagged(lengths, length=3, height=2, width=3):
    """M (B x T x 1 x H' x W') with entry 100 * word + pixel."""
    word = torch.arange(length).view(1, length, 1, 1, 1)
    pixel = torch.arange(height * width).view(1, 1, 1, height, width)
    return (100 * word + pixel).float().expand(len(lengths), -1, -1, -1, -1).clone()


def flattened(M, lengths):
    stub = types.SimpleNamespace(msru=Identity())
    return SynthesisModule._flattened(stub, M, torch.tensor(lengths)), stub.msru.seen


def test_sequence_is_pixel_major_and_readout_is_the_last_pixels():
    R, seen = flattened(tagged([3]), [3])
    assert seen[:, 0, 0].tolist()[:7] == [0, 100, 200, 1, 101, 201, 2]
    assert seen[:, 0, 0].tolist() == [100 * t + p for p in range(6) for t in range(3)]
    assert R[0, 0].tolist() == [[4, 104, 204], [5, 105, 205]]  # scrambled: pixels 4, 5 with words 0-2


def test_one_word_reads_each_pixel_at_its_own_step():
    R, _ = flattened(tagged([1], length=1), [1])
    assert R[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_padding_goes_to_the_end_of_each_sample():
    R, seen = flattened(tagged([3, 2]), [3, 2])
    alone, _ = flattened(tagged([2], length=2), [2])
    assert torch.equal(R[1], alone[0])  # sample 1 in a padded batch = sample 1 run alone
    assert seen[:12, 1, 0].tolist() == [100 * t + p for p in range(6) for t in range(2)]
    assert all(v % 100 < 6 and v // 100 == 2 for v in seen[12:, 1, 0].tolist())  # its padding word, last


def test_index_lists_every_step_once():
    index = original_sequence_index(torch.tensor([4, 1, 3]), 4, 5)
    assert index.shape == (20, 3)
    assert all(sorted(index[:, b].tolist()) == list(range(20)) for b in range(3))


def test_equals_the_original_reshapes_with_a_real_msru():
    """Our batched code against a transcription of the original's reshapes, batch 1, a real SRU."""
    torch.manual_seed(0)
    sm = DMN(DMNConfig.preset("tiny", vocab_size=20, msru_order="flattened")).synthesis.eval()
    length, height, width = 4, 3, 5
    q = torch.randn(length, 1, sm.config.sm_channels, height, width)  # the original's L x 1 x M x H x W
    with torch.no_grad():
        seq = q.view(length, 1, q.shape[2], height * width).permute(3, 0, 1, 2).reshape(height * width * length, 1, -1)
        out = sm.msru(seq)[-(height * width):]  # the last H*W steps
        original = out.permute(1, 2, 0).reshape(1, -1, height, width)
        ours = sm._flattened(q.permute(1, 0, 2, 3, 4), torch.tensor([length]))
    torch.testing.assert_close(ours, original)
