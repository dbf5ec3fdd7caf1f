"""The from-scratch SRU (eq. 2-6) computes exactly what the `sru` package computes."""
import pytest
import torch

from dmn_lib._sru_package import import_sru, quiet_cpu_training
from dmn_lib.models.recurrent import make_rnn
from dmn_lib.models.sru import SRU, copy_from_package

sru = import_sru()


def _package_sru(input_size, hidden_size, layers, activation):
    theirs = sru.SRU(input_size, hidden_size, num_layers=layers, use_tanh=(activation == "tanh"))
    with torch.no_grad():  # non-zero biases so every term of eq. 3-4 is exercised
        for cell in theirs.rnn_lst:
            cell.bias.normal_(0, 0.5)
    return theirs


@pytest.mark.filterwarnings("ignore:use_tanh = True is deprecated")
@pytest.mark.parametrize(
    "input_size,hidden_size,activation",
    [(12, 12, "identity"), (7, 12, "identity"), (7, 12, "tanh")],
    ids=["no-skip-projection", "skip-projection", "tanh"],
)
def test_copy_from_package_matches_outputs_and_gradients(input_size, hidden_size, activation):
    theirs = _package_sru(input_size, hidden_size, 3, activation)
    ours = copy_from_package(SRU(input_size, hidden_size, 3, activation), theirs)
    assert ours.layers[0].k == (3 if input_size == hidden_size else 4)
    x = torch.randn(9, 5, input_size, requires_grad=True)

    with quiet_cpu_training():
        h_theirs, c_theirs = theirs(x)
    h_ours, c_ours = ours(x)
    torch.testing.assert_close(h_ours, h_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_theirs, atol=1e-5, rtol=1e-5)

    target = torch.randn_like(h_ours)
    grads_theirs = torch.autograd.grad((h_theirs * target).sum(), [x, *theirs.parameters()])
    grads_ours = torch.autograd.grad((h_ours * target).sum(), [x, *ours.parameters()])
    assert len(grads_theirs) == len(grads_ours)
    for g_t, g_o in zip(grads_theirs, grads_ours):
        torch.testing.assert_close(g_o, g_t, atol=1e-5, rtol=1e-5)

    with torch.no_grad():  # the package's compiled C++ inference op, too
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=1e-5)


def test_copy_from_package_refuses_different_maths():
    with pytest.raises(ValueError, match="Activation g differs"):
        copy_from_package(SRU(6, 6, 2, "sigmoid"), sru.SRU(6, 6, num_layers=2))
    with pytest.raises(ValueError, match="Layer count"):
        copy_from_package(SRU(6, 6, 3), sru.SRU(6, 6, num_layers=2))
    with pytest.raises(ValueError, match="layer_norm"):
        copy_from_package(SRU(6, 6, 2), sru.SRU(6, 6, num_layers=2, layer_norm=True))


def test_sigmoid_g_is_the_papers_choice_and_differs_from_identity():
    torch.manual_seed(1)
    a = SRU(5, 5, 1, "identity")
    b = SRU(5, 5, 1, "sigmoid")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 5)
    assert not torch.allclose(a(x)[0], b(x)[0])


@pytest.mark.parametrize("kind", ["sru", "sru_scratch", "lstm"])
def test_three_kinds_share_one_interface(kind):
    rnn = make_rnn(kind, 6, 10, 2)
    h = rnn(torch.randn(4, 3, 6))
    assert h.shape == (4, 3, 10)
    # causal: a later step never changes an earlier output (so right padding is harmless)
    x = torch.randn(5, 2, 6)
    y = x.clone()
    y[3:] = 7.0
    torch.testing.assert_close(rnn(x)[:3], rnn(y)[:3])


def test_unknown_rnn_kind():
    with pytest.raises(ValueError, match="Unknown rnn kind"):
        make_rnn("gru", 4, 4, 1)


@pytest.mark.parametrize("kernel", ["python", "cpp"])
@pytest.mark.parametrize("input_size", [12, 7], ids=["no-skip-projection", "skip-projection"])
def test_papers_gates_equal_the_package_with_v_zeroed(input_size, kernel):
    """gates="paper" is eq. 3-4 as the paper writes them (no c_(t-1)): the package's SRU with v = 0."""
    theirs = _package_sru(input_size, 12, 2, "identity")
    ours = copy_from_package(SRU(input_size, 12, 2, gates="paper", kernel=kernel), theirs)
    assert all(name != "weight_c" for layer in ours.layers for name, _ in layer.named_parameters())
    with torch.no_grad():
        for cell in theirs.rnn_lst:
            cell.weight_c.zero_()
    x = torch.randn(6, 3, input_size, requires_grad=True)
    with quiet_cpu_training():
        h_theirs, _ = theirs(x)
    h_ours, _ = ours(x)
    torch.testing.assert_close(h_ours, h_theirs, atol=1e-5, rtol=1e-5)
    target = torch.randn_like(h_ours)
    grad_theirs = torch.autograd.grad((h_theirs * target).sum(), [x, theirs.rnn_lst[0].weight])
    grad_ours = torch.autograd.grad((h_ours * target).sum(), [x, ours.layers[0].weight])
    for g_t, g_o in zip(grad_theirs, grad_ours):
        torch.testing.assert_close(g_o, g_t, atol=1e-5, rtol=1e-5)


def test_papers_gates_ignore_the_previous_cell_in_the_gates():
    torch.manual_seed(0)
    package, paper = SRU(4, 4, 1), SRU(4, 4, 1, gates="paper")
    paper.load_state_dict({k: v for k, v in package.state_dict().items() if "weight_c" not in k}, strict=False)
    x = torch.randn(5, 2, 4)
    assert not torch.allclose(package(x)[0], paper(x)[0])  # same W and b, the package's v != 0
    with torch.no_grad():
        package.layers[0].weight_c.zero_()
    torch.testing.assert_close(package(x)[0], paper(x)[0])
    with pytest.raises(ValueError, match="gates must be one of"):
        SRU(4, 4, 1, gates="lstm")
