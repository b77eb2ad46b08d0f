"""Every worked example of the user's seed documents (/work/shared/seeds), reproduced by normkit.

The seeds print torch's results with 4 decimals; normkit, on every backend, must print the same.
Each test names the seed file it reproduces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import normkit
from cases import BACKENDS, TOLERANCES, assert_close_to_reference, seed_of, skip_if_declined


def _assert_printed(actual: Tensor, printed: Tensor | list, tolerance: str = "seed_printed") -> None:
    """``actual`` agrees with numbers a seed printed with 4 decimals."""
    tol = TOLERANCES[tolerance]
    torch.testing.assert_close(actual.detach(), torch.as_tensor(printed, dtype=actual.dtype),
                               rtol=tol.rtol, atol=tol.atol)


# ---- seed 000: BatchNorm2d and two LayerNorm examples -------------------------------------------

_SEED000_BN_INPUT = [
    [[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
     [[11, 12, 13], [14, 15, 16], [17, 18, 19]]],
    [[[11, 13, 15], [17, 19, 21], [23, 25, 27]],
     [[21, 23, 25], [27, 29, 31], [33, 35, 37]]],
]
_SEED000_BN_SAMPLE0 = [[-1.3574, -1.2340, -1.1106], [-0.9872, -0.8638, -0.7404], [-0.6170, -0.4936, -0.3702]]
_SEED000_BN_SAMPLE1 = [[-0.1234, 0.1234, 0.3702], [0.6170, 0.8638, 1.1106], [1.3574, 1.6042, 1.8511]]


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed000_batch_norm_2d(backend: str) -> None:
    """000_1180a778a6739233: ``nn.BatchNorm2d(2)`` on a (2, 2, 3, 3) input, training mode."""
    m = normkit.BatchNorm2d(2, backend=backend)
    output = m(torch.tensor(_SEED000_BN_INPUT, dtype=torch.float32))
    # both channels print the same numbers: channel 1 is channel 0 plus 10 in both samples
    _assert_printed(output, [[_SEED000_BN_SAMPLE0] * 2, [_SEED000_BN_SAMPLE1] * 2])


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed000_layer_norm_nlp(backend: str) -> None:
    """000_1180a778a6739233: ``nn.LayerNorm(4)`` on a (2, 3, 4) "sentence" batch."""
    x = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
                      [[21, 22, 23, 24], [25, 26, 27, 28], [29, 30, 31, 32]]], dtype=torch.float32)
    output = normkit.LayerNorm(4, backend=backend)(x)
    _assert_printed(output, [[[-1.3416, -0.4472, 0.4472, 1.3416]] * 3] * 2)


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed000_layer_norm_image(backend: str) -> None:
    """000_1180a778a6739233: ``nn.LayerNorm([2, 3, 3])`` on a (2, 2, 3, 3) image batch."""
    x = torch.tensor([[[[1, 2, 3], [11, 12, 13], [21, 22, 23]],
                       [[51, 52, 53], [61, 62, 63], [71, 72, 73]]],
                      [[[81, 82, 83], [91, 92, 93], [101, 102, 103]],
                       [[111, 112, 113], [121, 122, 123], [131, 132, 133]]]], dtype=torch.float32)
    output = normkit.LayerNorm([2, 3, 3], backend=backend)(x)
    _assert_printed(output, [
        [[[-1.3682, -1.3302, -1.2922], [-0.9881, -0.9501, -0.9121], [-0.6081, -0.5701, -0.5321]],
         [[0.5321, 0.5701, 0.6081], [0.9121, 0.9501, 0.9881], [1.2922, 1.3302, 1.3682]]],
        [[[-1.5207, -1.4622, -1.4037], [-0.9358, -0.8773, -0.8188], [-0.3509, -0.2924, -0.2339]],
         [[0.2339, 0.2924, 0.3509], [0.8188, 0.8773, 0.9358], [1.4037, 1.4622, 1.5207]]],
    ])


# ---- seed 004: LayerNorm over (C, H, W), and over C at every pixel -------------------------------


def _seed004_input() -> Tensor:
    """The seed's (1, 3, 5, 5) input: channel c is ``arange(start_c, start_c + 25)``, built as the
    seed builds it (np.dstack to HWC, ToTensor's HWC -> CHW transpose, unsqueeze)."""
    arr = np.dstack((np.arange(1, 26).reshape(5, 5), np.arange(11, 36).reshape(5, 5),
                     np.arange(31, 56).reshape(5, 5)))
    arr = np.reshape(arr, [5, 5, 3]).astype(np.float32)
    return torch.from_numpy(arr.transpose((2, 0, 1)).copy()).unsqueeze(0)


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed004_layer_norm_over_chw(backend: str) -> None:
    """004_db8143bbc2a5753a, first method: ``nn.LayerNorm([3, 5, 5])`` and the seed's manual
    ``(x - mean) / sqrt(var + 1e-5)``; the seed prints channels 0 and 2 (channel 1 is elided)."""
    arr = _seed004_input()
    output = normkit.LayerNorm([3, 5, 5], backend=backend)(arr)
    _assert_printed(output[0, 0], [[-1.7584, -1.6890, -1.6196, -1.5502, -1.4808],
                                   [-1.4114, -1.3420, -1.2725, -1.2031, -1.1337],
                                   [-1.0643, -0.9949, -0.9255, -0.8561, -0.7867],
                                   [-0.7173, -0.6478, -0.5784, -0.5090, -0.4396],
                                   [-0.3702, -0.3008, -0.2314, -0.1620, -0.0925]])
    _assert_printed(output[0, 2], [[0.3239, 0.3933, 0.4627, 0.5322, 0.6016],
                                   [0.6710, 0.7404, 0.8098, 0.8792, 0.9486],
                                   [1.0180, 1.0875, 1.1569, 1.2263, 1.2957],
                                   [1.3651, 1.4345, 1.5039, 1.5733, 1.6427],
                                   [1.7122, 1.7816, 1.8510, 1.9204, 1.9898]])
    u = arr.mean()
    s = (arr - u).pow(2).mean()
    assert_close_to_reference(output, (arr - u) / torch.sqrt(s + 1e-5), name="seed 004 manual")


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "permuted_view"])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed004_layer_norm_over_channels_at_every_pixel(backend: str, contiguous: bool) -> None:
    """004_db8143bbc2a5753a, second method: LayerNorm(3) over C at each pixel, via a permute to
    (1, 5, 5, 3) (the seed makes it contiguous; a plain permuted view must work as well), against
    the seed's channels-first manual version (eps 1e-6) with a random affine."""
    arr = _seed004_input()
    nhwc = arr.permute(0, 2, 3, 1)
    nhwc = nhwc.contiguous() if contiguous else nhwc
    output = normkit.LayerNorm(3, backend=backend)(nhwc)
    assert output.shape == (1, 5, 5, 3)
    # every pixel's channels are (p, p + 10, p + 30): the same normalized triple everywhere
    _assert_printed(output, torch.tensor([-1.0690, -0.2673, 1.3363]).expand(1, 5, 5, 3))
    # the manual version: channels-first, eps 1e-6, then weight[:, None, None] * x + bias[:, None, None]
    gen = torch.Generator().manual_seed(seed_of("seed004"))
    weight, bias = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    u = arr.mean(dim=1, keepdim=True)
    s = (arr - u).pow(2).mean(1, keepdim=True)
    manual = weight[:, None, None] * ((arr - u) / torch.sqrt(s + 1e-6)) + bias[:, None, None]
    norm = normkit.LayerNorm(3, eps=1e-6, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    assert_close_to_reference(norm(nhwc).permute(0, 3, 1, 2), manual, name="seed 004 manual, eps 1e-6")
    _assert_printed(((arr - u) / torch.sqrt(s + 1e-6))[0, :, 0, 0], [-1.0690, -0.2673, 1.3363])


# ---- seed 001: from-scratch BN / LN / GN / IN against the library ------------------------------
# The seed's four model classes, as the seed writes them.


class BatchNormalizationModel(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return self.gamma.view(1, -1, 1, 1) * x_hat + self.beta.view(1, -1, 1, 1)


class LayerNormalizationModel(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return self.gamma * x_hat + self.beta


class GroupNormalizationModel(nn.Module):
    def __init__(self, num_features, num_groups, eps=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.num_groups = num_groups
        self.eps = eps

    def forward(self, x):
        N, C, H, W = x.size()
        x = x.view(N, self.num_groups, -1)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        x_hat = x_hat.view(N, C, H, W)
        return self.gamma.view(1, -1, 1, 1) * x_hat + self.beta.view(1, -1, 1, 1)


class InstanceNormalizationModel(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x):
        N, C, H, W = x.size()
        x = x.view(N * C, -1)
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        x_hat = x_hat.view(N, C, H, W)
        return self.gamma.view(1, -1, 1, 1) * x_hat + self.beta.view(1, -1, 1, 1)


# (seed model, the seed's torch module as a normkit one, input shape): the seed's shapes with
# smaller batch and spatial sizes (20x10x50x50 -> 4x10x6x6, LayerNorm 1000 -> 100).
_SEED001 = {
    "bn": (lambda: BatchNormalizationModel(10), lambda **kw: normkit.BatchNorm2d(10, **kw), (4, 10, 6, 6)),
    "ln": (lambda: LayerNormalizationModel(100), lambda **kw: normkit.LayerNorm(100, **kw), (4, 10, 100)),
    "gn": (lambda: GroupNormalizationModel(10, 2), lambda **kw: normkit.GroupNorm(2, 10, **kw), (4, 10, 6, 6)),
    "in": (lambda: InstanceNormalizationModel(10), lambda **kw: normkit.InstanceNorm2d(10, **kw), (4, 10, 6, 6)),
}


@pytest.mark.parametrize("params", ["seed", "random"])
@pytest.mark.parametrize("norm", sorted(_SEED001))
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed001_from_scratch_models_match(backend: str, norm: str, params: str) -> None:
    """001_4908563c2dcf33f7: ``torch.allclose(seed_model(x), library_module(x), atol=1e-6)`` is
    True, with the seed's parameters (gamma 1, beta 0; InstanceNorm2d without affine, as the seed
    builds it) and with random ones; and the input gradients agree for a random upstream gradient."""
    make_seed_model, make_module, shape = _SEED001[norm]
    seed_model = make_seed_model()
    module = make_module(backend=backend, **({"affine": True} if norm == "in" and params == "random" else {}))
    gen = torch.Generator().manual_seed(seed_of("seed001", norm))
    if params == "random":
        with torch.no_grad():
            seed_model.gamma.copy_(torch.randn(seed_model.gamma.shape, generator=gen))
            seed_model.beta.copy_(torch.randn(seed_model.beta.shape, generator=gen))
            module.weight.copy_(seed_model.gamma)
            module.bias.copy_(seed_model.beta)
    x = torch.randn(shape, generator=gen).requires_grad_()
    expected, actual = seed_model(x), module(x)
    tol = TOLERANCES["seed_allclose"]
    assert torch.allclose(expected, actual, rtol=tol.rtol, atol=tol.atol)
    dy = torch.randn(expected.shape, generator=gen)
    (dx_expected,) = torch.autograd.grad(expected, x, dy)
    (dx_actual,) = torch.autograd.grad(actual, x, dy)
    tol = TOLERANCES["seed_allclose_grad"]
    torch.testing.assert_close(dx_actual, dx_expected, rtol=tol.rtol, atol=tol.atol)


# ---- seed 002: LazyBatchNorm2d after a Conv2d ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed002_lazy_batch_norm_learns_channels_then_rejects_others(backend: str) -> None:
    """002_1e70ae90af86f5a0: ``LazyBatchNorm2d`` after ``Conv2d(2, 3, 1)`` on ones(1, 2, 28, 28)
    becomes a 3-channel BatchNorm2d; a (1, 4, 28, 28) input then raises torch's RuntimeError,
    and (unlike torch, which has already counted the batch) leaves every buffer as it was."""
    torch.manual_seed(seed_of("seed002"))
    con = nn.Conv2d(2, 3, 1)
    nor, twin = normkit.LazyBatchNorm2d(backend=backend), nn.LazyBatchNorm2d()
    tmp = torch.ones((1, 2, 28, 28))
    s, expected = nor(con(tmp)), twin(con(tmp))
    assert type(nor) is normkit.BatchNorm2d and nor.num_features == 3 and nor.weight.shape == (3,)
    # every pixel of a channel is the same conv output: zero variance, so the output is the bias (0)
    assert_close_to_reference(s, expected)
    torch.testing.assert_close(s, torch.zeros_like(s), rtol=0, atol=TOLERANCES["seed_printed"].atol)
    assert s.permute(1, 0, 2, 3).reshape(3, -1).shape == (3, 784)
    for name, buffer in nor.named_buffers():
        assert_close_to_reference(buffer, getattr(twin, name), name=name)
    before = {k: v.clone() for k, v in nor.state_dict().items()}
    t = torch.ones((1, 4, 28, 28))
    with pytest.raises(RuntimeError) as theirs:
        twin(t)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3") as ours:
        nor(t)
    assert str(ours.value) == str(theirs.value)
    for key, value in nor.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by the failed call"
    assert nor.num_batches_tracked.item() == 1


# ---- seed 003: one output element of BatchNorm2d by hand ----------------------------------------

_SEED003_INPUT = [[[[-2.4308, -1.0281, -1.1322, 0.9819], [-0.4069, 0.7973, 1.6296, 1.6797],
                    [0.2802, -0.8285, 2.0101, 0.1286]],
                   [[-0.5740, 0.1970, -0.7209, -0.7231], [-0.1489, 0.4993, 0.4159, 1.4238],
                    [0.0334, -0.6333, 0.1308, -0.2180]]]]
_SEED003_WEIGHT = [0.5653, 0.0322]
_SEED003_OUTPUT = [[[[-1.1237, -0.5106, -0.5561, 0.3679], [-0.2391, 0.2873, 0.6510, 0.6729],
                     [0.0612, -0.4233, 0.8173, -0.0050]],
                    [[-0.0293, 0.0120, -0.0372, -0.0373], [-0.0066, 0.0282, 0.0237, 0.0777],
                     [0.0032, -0.0325, 0.0084, -0.0103]]]]


def _by_hand(m: nn.Module, input: Tensor, c: int = 0) -> Tensor:
    """The seed's formula for ``output[0][c]``: the channel's mean and biased variance."""
    mean = torch.Tensor.mean(input[0][c])
    var = torch.Tensor.var(input[0][c], False)  # no Bessel's correction, as the seed stresses
    return ((input[0][c] - mean) / torch.pow(var + m.eps, 0.5)) * m.weight[c] + m.bias[c]


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed003_batch_norm_2d_element_by_hand(backend: str) -> None:
    """003_6f8f140c3c6f8cc0: with a random (1, 2, 3, 4) input and random weight and bias,
    ``output[0][0][0][0]`` (and the whole of each channel) is the seed's hand formula."""
    gen = torch.Generator().manual_seed(seed_of("seed003"))
    m = normkit.BatchNorm2d(2, affine=True, backend=backend)
    with torch.no_grad():
        m.weight.copy_(torch.randn(2, generator=gen))
        m.bias.copy_(torch.randn(2, generator=gen))
    input = torch.randn(1, 2, 3, 4, generator=gen)
    output = m(input)
    with torch.no_grad():
        bacthnormone = _by_hand(m, input)[0][0]
        assert_close_to_reference(output[0][0][0][0], bacthnormone, name="output[0][0][0][0]")
        for c in range(2):
            assert_close_to_reference(output[0][c], _by_hand(m, input, c), name=f"channel {c}")


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_seed003_printed_numbers(backend: str) -> None:
    """003_6f8f140c3c6f8cc0: the printed input and weight [0.5653, 0.0322] (bias 0) give the
    printed output, mean 0.1401, variance 1.6730 and ``bacthnormone`` -1.1237 (to the 4 printed
    decimals of the input)."""
    m = normkit.BatchNorm2d(2, affine=True, backend=backend)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(_SEED003_WEIGHT))
    input = torch.tensor(_SEED003_INPUT)
    output = m(input)
    _assert_printed(output, _SEED003_OUTPUT, "seed_printed_input")
    _assert_printed(torch.Tensor.mean(input[0][0]), 0.1401, "seed_printed_input")
    _assert_printed(torch.Tensor.var(input[0][0], False), 1.6730, "seed_printed_input")
    _assert_printed(output[0][0][0][0], -1.1237, "seed_printed_input")
    with torch.no_grad():
        assert_close_to_reference(output[0][0], _by_hand(m, input), name="by hand")
