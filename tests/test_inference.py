"""dmn_lib.inference.predict / probabilities: one query on one image, as the CLI and notebook 11 call it."""
import numpy as np
import pytest
import torch

from dmn_lib.config import DMNConfig
from dmn_lib.data import Collate, image_to_tensor
from dmn_lib.data.synthetic import SynthRef
from dmn_lib.data.vocab import Vocabulary
from dmn_lib.inference import predict, probabilities
from dmn_lib.models.dmn import DMN


@pytest.fixture(scope="module")
def model_and_vocab():
    vocab = Vocabulary(["the", "red", "blue", "circle", "square", "left"])
    torch.manual_seed(0)
    return DMN(DMNConfig.preset("tiny", vocab_size=len(vocab))).eval(), vocab


def test_predict_is_the_model_at_the_image_size(model_and_vocab):
    model, vocab = model_and_vocab
    image = SynthRef("unc", "val", size=1, image_size=64).raw(0)[0]
    p = predict(model, vocab, image, "the red zebra", threshold=0.3)
    batch = Collate(vocab)([{"image": image_to_tensor(image), "mask": torch.zeros(1, 64, 64), "text": "the red zebra"}])
    with torch.no_grad():
        expected = torch.sigmoid(model(batch["images"], batch["tokens"], batch["lengths"]))[0, 0].numpy()
    np.testing.assert_array_equal(p.probability, expected)
    assert p.mask.dtype == bool and np.array_equal(p.mask, expected > 0.3)
    assert p.tokens == ["the", "red", "<unk>"] and p.unknown == ["zebra"] and p.network_size is None


def test_predict_resizes_for_the_network_and_back(model_and_vocab):
    model, vocab = model_and_vocab
    image = np.asarray(SynthRef("unc", "val", size=1, image_size=128).raw(0)[0])[:96]  # 96 x 128, not square
    p = predict(model, vocab, image, "the blue square", image_size=64)
    assert p.probability.shape == (96, 128) and p.network_size == 64
    batch = probabilities(model, vocab, [image, image], ["the blue square", "the left circle"], size=64)
    np.testing.assert_allclose(batch[0].numpy(), p.probability, atol=1e-6)  # a batch of 2: other kernels


def test_predict_bad_inputs(model_and_vocab):
    model, vocab = model_and_vocab
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="The query is empty"):
        predict(model, vocab, image, " ")
    with pytest.raises(ValueError, match="None of the words"):
        predict(model, vocab, image, "xyzzy")
    with pytest.raises(ValueError, match="smaller than the network's stride of 32"):
        predict(model, vocab, np.zeros((20, 40, 3), np.uint8), "the red circle")
    with pytest.raises(ValueError, match="multiple of the stride"):
        predict(model, vocab, image, "the red circle", image_size=40)
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        predict(model, vocab, image.astype(np.float32), "the red circle")
