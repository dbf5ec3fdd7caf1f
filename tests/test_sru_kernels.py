"""The fused SRU kernels (Triton, C++) compute what the `sru` package computes: outputs and gradients.

On a machine without CUDA the Triton kernel runs in Triton's interpreter on CPU tensors: Triton
reads TRITON_INTERPRET when dmn_lib.models._sru_triton is imported (at its @triton.jit), so it is set
here, before anything imports that module. With CUDA the Triton tests run on the GPU instead, and
the tests marked `cuda` below run too (scripts/gpu_check.sh); without it they are skipped.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dmn_lib import DMN, DMNConfig
from dmn_lib._sru_package import import_sru, quiet_cpu_training
from dmn_lib.models import _sru_fused
from dmn_lib.models.sru import SRU, FusedSRU, copy_from_package

sru = import_sru()
try:
    from dmn_lib.models import _sru_triton
except ImportError:  # no triton (e.g. macOS): the C++ kernel is still tested
    _sru_triton = None

NO_CUDA = "needs a CUDA GPU (run by scripts/gpu_check.sh on a GPU machine)"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def _triton_device():
    if _sru_triton is None:
        return None
    return "cpu" if _sru_triton.interpreted() else "cuda"


# (kernel, device): the C++ kernel on the CPU; Triton on the GPU, or interpreted on the CPU.
KERNELS = [pytest.param("cpp", "cpu", id="cpp")]
if _triton_device() is not None:
    KERNELS.append(pytest.param("triton", _triton_device(), id=f"triton-{_triton_device()}"))


def _package_sru(input_size, hidden_size, layers, activation):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="use_tanh = True is deprecated")
        theirs = sru.SRU(input_size, hidden_size, num_layers=layers, use_tanh=(activation == "tanh"))
    with torch.no_grad():  # non-zero biases so every term of eq. 3-4 is exercised
        for cell in theirs.rnn_lst:
            cell.bias.normal_(0, 0.5)
    return theirs


def _outputs_and_grads(net, x, c0, target_h, target_c):
    x = x.clone().requires_grad_()
    c0 = c0.clone().requires_grad_()
    h, c = net(x, c0)
    loss = (h.float() * target_h).sum() + (c.float() * target_c).sum()  # touches h, c_T and, through c0, every state
    grads = torch.autograd.grad(loss, [x, c0, *net.parameters()])
    return [h, c, *grads]


def _assert_all_close(ours, theirs, atol=1e-5, rtol=1e-5):
    names = ["h", "c_T", "grad x", "grad c0"] + [f"grad param {i}" for i in range(len(ours) - 4)]
    assert len(ours) == len(theirs)
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a.detach().cpu().to(b.dtype), b.detach(), atol=atol, rtol=rtol, msg=name)


def test_triton_runs_interpreted_without_cuda():
    """Guards the set-up above: if _sru_triton was imported before TRITON_INTERPRET was set, say so."""
    if _sru_triton is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        assert _sru_triton.interpreted(), "dmn_lib.models._sru_triton was imported before TRITON_INTERPRET=1 was set"


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize(
    "input_size,hidden_size,layers,activation,length,batch",
    [(12, 12, 3, "identity", 9, 5), (7, 12, 3, "identity", 9, 5), (7, 12, 2, "tanh", 6, 3),
     (13, 5, 2, "identity", 11, 7), (5, 5, 1, "tanh", 1, 1), (3, 33, 3, "tanh", 4, 2)],
    ids=["no-skip-projection", "skip-projection", "tanh", "odd-sizes", "one-step", "hidden-33"],
)
def test_kernel_equals_the_package(kernel, device, input_size, hidden_size, layers, activation, length, batch):
    theirs = _package_sru(input_size, hidden_size, layers, activation)
    ours = copy_from_package(SRU(input_size, hidden_size, layers, activation, kernel=kernel), theirs).to(device)
    assert ours.layers[0].k == (3 if input_size == hidden_size else 4)
    x, c0 = torch.randn(length, batch, input_size), torch.randn(layers, batch, hidden_size)
    targets = torch.randn(length, batch, hidden_size), torch.randn(layers, batch, hidden_size)
    with quiet_cpu_training():
        expected = _outputs_and_grads(theirs, x, c0, *targets)
    got = _outputs_and_grads(ours, x.to(device), c0.to(device), *(t.to(device) for t in targets))
    _assert_all_close(got, expected)


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_sigmoid_g_equals_the_python_loop(kernel, device):
    """The package has no sigmoid g (the paper's text): compare with the readable loop instead."""
    loop = SRU(6, 9, 2, "sigmoid")
    fused = SRU(6, 9, 2, "sigmoid", kernel=kernel)
    with torch.no_grad():
        for layer in loop.layers:
            layer.bias.normal_(0, 0.5)
    fused.load_state_dict(loop.state_dict())
    x, c0 = torch.randn(5, 4, 6), torch.randn(2, 4, 9)
    targets = torch.randn(5, 4, 9), torch.randn(2, 4, 9)
    expected = _outputs_and_grads(loop, x, c0, *targets)
    got = _outputs_and_grads(fused.to(device), x.to(device), c0.to(device), *(t.to(device) for t in targets))
    _assert_all_close(got, expected)


@pytest.mark.parametrize("activation", ["identity", "tanh", "sigmoid"])
@pytest.mark.parametrize("k", [3, 4])
def test_cpp_backward_passes_gradcheck_in_float64(activation, k):
    """The hand-written backward against finite differences, for every input of the kernel."""
    length, batch, d = 4, 3, 5
    U = torch.randn(length, batch, d, k, dtype=torch.float64, requires_grad=True)
    x = torch.randn(length, batch, d, dtype=torch.float64, requires_grad=True)
    weight_c = torch.randn(2 * d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * d, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(batch, d, dtype=torch.float64, requires_grad=True)
    inputs = (U, x, weight_c, bias, c0) if k == 3 else (U, weight_c, bias, c0)

    def fn(*args):
        U, x, weight_c, bias, c0 = args if k == 3 else (args[0], None, *args[1:])
        skip = x if k == 3 else U.new_zeros(length, batch, 7)  # k = 4: any input size, never read
        return _sru_fused.fused_recurrence(U, skip, weight_c, bias, c0, activation, "cpp")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_dmn_forward_with_mixed_query_lengths(kernel, device):
    """A tiny DMN (k = 4 in the LM's first layer, odd sizes): fused kernel = Python loop, gradients too."""
    config = DMNConfig.preset("tiny", vocab_size=30, lm_hidden=17, msru_hidden=15)
    model = DMN(config).train()
    layers = [m for m in model.modules() if isinstance(m, FusedSRU)]
    assert len(layers) == 2 and layers[0].layers[0].k == 4
    images = torch.randn(3, 3, 64, 96)
    tokens = torch.randint(2, 30, (3, 6))
    lengths = torch.tensor([6, 3, 1])
    tokens[1, 3:] = tokens[2, 1:] = 0  # right padding

    def run(kernel_name, dev):
        for net in layers:
            for layer in net.layers:
                layer.kernel = kernel_name
        model.to(dev).zero_grad(set_to_none=True)
        logits = model(images.to(dev), tokens.to(dev), lengths.to(dev))
        logits.square().mean().backward()
        return [logits] + [p.grad for net in layers for p in net.parameters()]

    # Both on the same device, so that only the recurrence differs (not, say, cuDNN's TF32 convolutions).
    expected = [t.detach().clone() for t in run("python", device)]
    got = run(kernel, device)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_sru_has_the_package_state_dict_and_initial_weights():
    torch.manual_seed(5)
    theirs = sru.SRU(7, 12, num_layers=3)
    torch.manual_seed(5)
    ours = FusedSRU(7, 12, num_layers=3)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)  # rnn_lst.{i}.weight / weight_c / bias / scale_x, in the same order
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        for cell in theirs.rnn_lst:
            cell.bias.normal_(0, 0.5)
    ours.load_state_dict(theirs.state_dict())  # strict, both ways
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=1e-5)


def test_auto_falls_back_to_the_python_loop_with_a_warning(monkeypatch):
    monkeypatch.setattr(_sru_fused, "_cpp_problem", lambda device: "Could not build the C++ op (test).")
    monkeypatch.setattr(_sru_fused, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Could not build the C.. op .test.*Python loop instead"):
        assert _sru_fused.resolve_kernel("auto", torch.device("cpu")) == "python"
    with pytest.raises(RuntimeError, match="Could not build"):
        _sru_fused.resolve_kernel("cpp", torch.device("cpu"))
    net, loop = FusedSRU(4, 4, 1), SRU(4, 4, 1)
    loop.load_state_dict({k.replace("rnn_lst", "layers"): v for k, v in net.state_dict().items() if "scale_x" not in k})
    x = torch.randn(3, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(net(x)[0], loop(x)[0], atol=0, rtol=0)  # it ran the same loop


def test_explicit_kernels_say_where_they_run(monkeypatch):
    with pytest.raises(RuntimeError, match="CPU tensors"):
        _sru_fused.resolve_kernel("cpp", torch.device("cuda"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        SRU(4, 4, 1, kernel="cuda")
    if _sru_triton is not None:
        monkeypatch.setattr(_sru_triton, "interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            _sru_fused.resolve_kernel("triton", torch.device("cpu"))
    assert _sru_fused.resolve_kernel("auto", torch.device("cpu")) == "cpp"


@pytest.mark.skipif(_sru_triton is None, reason="triton is not installed")
def test_triton_kernels_compile_for_hopper():
    """Not only interpreted: compiled by Triton's real backend for an H100/H200 (sm_90), no GPU needed."""
    code = (
        "from dmn_lib.models import _sru_triton as m\n"
        "assert not m.interpreted()\n"
        "for dtype, k, activation in [('fp32', 3, 0), ('bf16', 4, 1), ('fp16', 3, 2)]:\n"
        "    ptx = m.compile_for(90, dtype, k, activation)\n"
        "    assert all('.target sm_90' in text for text in ptx.values()), ptx.keys()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_gpu_check_script_is_valid_bash():
    """scripts/gpu_check.sh runs on a GPU machine only; its --cpu-smoke mode (~35 s) is run by hand."""
    subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_building_and_training_a_dmn_never_imports_the_sru_package():
    """The package's CUDA build fails against recent torch and costs ~50 s on a machine with nvcc."""
    code = (
        "import sys, torch\n"
        "import dmn_lib\n"
        "from dmn_lib import DMN, DMNConfig\n"
        "model = DMN(DMNConfig.preset('tiny', vocab_size=20))\n"
        "logits = model(torch.randn(2, 3, 64, 64), torch.randint(2, 20, (2, 4)), torch.tensor([4, 2]))\n"
        "logits.mean().backward()\n"
        "assert model.language.rnn.net.rnn_lst[0].weight.grad is not None\n"
        "print('sru' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# CUDA only: the compiled Triton kernel, AMP dtypes, the DMN on the GPU
# ------------------------------------------------------------------------------------------------
@cuda_only
def test_auto_uses_triton_on_cuda():
    assert _sru_fused.resolve_kernel("auto", torch.device("cuda")) == "triton"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs_on_cuda_track_float32(dtype):
    """bf16 / fp16 inputs, float32 state: close to the float32 run, to the inputs' precision."""
    net = FusedSRU(24, 40, 3).cuda()
    x = torch.randn(12, 64, 24, device="cuda")
    h32 = net(x)[0]
    with torch.autocast("cuda", dtype=dtype):
        h16, c16 = net(x)
    assert c16.dtype == torch.float32
    assert (h16.float() - h32).abs().max() < 0.05
    h16.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@cuda_only
def test_dmn_trains_on_cuda_with_autocast():
    model = DMN(DMNConfig.preset("tiny", vocab_size=30)).cuda().train()
    images, tokens = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(2, 30, (4, 5), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(images, tokens, torch.tensor([5, 4, 2, 1], device="cuda"))
    logits.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
