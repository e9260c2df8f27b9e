"""Peak backpropagation: known answers, batched == looped, scoped patching, no weight gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import ranprm.models.backbones  # noqa: F401  (fills the registry)
from ranprm.errors import ConfigError
from ranprm.models.registry import build_backbone
from ranprm.prm.backprop import default_chunk_size, peak_backprop, peak_response_maps, peak_response_maps_looped
from ranprm.prm.peaks import upsample_crm

MODES = ("probability", "gradient")


def _crm_model(backbone: str = "tiny", num_classes: int = 3, **cfg: object) -> nn.Module:
    """Backbone + 1x1 class conv, with BN statistics and affine terms that make eval-mode BN do something
    (including negative scales, so a sign error in BN's backward would show)."""
    trunk = build_backbone(backbone, **cfg)
    model = nn.Sequential(trunk, nn.Conv2d(trunk.out_channels, num_classes, 1))
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) * 1.5 - 0.25)
            module.bias.data.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------------------
# Known answers


def _hand_model() -> nn.Module:
    """One conv, kernel (1, 3), padding (0, 1), one class: taps (left, centre, right) per input channel."""
    conv = nn.Conv2d(3, 1, kernel_size=(1, 3), padding=(0, 1), bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0] = torch.tensor([3.0, 1.0, 0.0])  # channel 0: positive taps
        conv.weight[0, 1, 0] = torch.tensor([0.0, -5.0, 0.0])  # channel 1: negative centre tap only
        conv.bias.fill_(0.7)  # the rule ignores the bias
    return conv


def _hand_image() -> Tensor:
    """(1, 3, 1, 2): channel 0 = [1, 3], channel 1 = [0, 0], channel 2 = [-1, -1] (sets m = -1, weight 0)."""
    return torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]], [[-1.0, -1.0]]]])


def test_probability_rule_matches_a_hand_computation() -> None:
    """Peak at the right pixel. m = -1, so x - m = [2, 4] on channel 0 and 0 elsewhere.

    Its taps: left = pixel 0, centre = pixel 1, right = zero padding. Z = 3*2 + 1*4 = 10 (channel 1's weight
    is negative: W+ = 0). grad = (x - m) * W+ / Z: pixel 0: 2*3/10 = 0.6, pixel 1: 4*1/10 = 0.4, so the PRM
    is [1, 2/3].
    """
    model, images = _hand_model(), _hand_image()
    peaks = torch.tensor([[0, 0, 0, 1]])
    expected = torch.tensor([[[1.0, 2.0 / 3.0]]])
    for fn in (peak_response_maps, peak_response_maps_looped):
        torch.testing.assert_close(fn(model, images, peaks, mode="probability"), expected)
    # The raw gradient, before normalisation, through the public context manager.
    x = images.clone().requires_grad_(True)
    with peak_backprop(model, "probability"):
        model(x)[0, 0, 0, 1].backward()
    torch.testing.assert_close(x.grad.sum(dim=1), torch.tensor([[[0.6, 0.4]]]))


def test_gradient_mode_matches_a_hand_computation() -> None:
    """The plain gradient of the right pixel's output: channel 0 = [3, 1], channel 1 = [0, -5], so the RGB sum
    is [3, -4], clamped [3, 0], normalised [1, 0]."""
    model, images = _hand_model(), _hand_image()
    peaks = torch.tensor([[0, 0, 0, 1]])
    for fn in (peak_response_maps, peak_response_maps_looped):
        torch.testing.assert_close(fn(model, images, peaks, mode="gradient"), torch.tensor([[[1.0, 0.0]]]))


def test_probability_rule_conserves_the_seed_through_a_conv_stack() -> None:
    """Without ReLU, BN or bias terms in the way, each conv's rule redistributes its upstream gradient exactly
    (sum over its inputs of (x - m) W+ / Z = 1), so the whole input gradient sums to the seed, 1."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.Conv2d(5, 2, 1))
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    with peak_backprop(model, "probability"):
        model(x)[0, 1, 2, 3].backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad.sum(), torch.tensor(1.0))


def test_gradient_mode_is_the_plain_input_gradient() -> None:
    model = _crm_model()
    images = torch.randn(2, 3, 32, 32)
    peaks = torch.tensor([[0, 1, 3, 1], [1, 2, 0, 3], [1, 0, 5, 6]])
    prms = peak_response_maps(model, images, peaks, sub_pixel_factor=2, mode="gradient", chunk_size=4)
    model.eval()
    for k, (b, c, y, x) in enumerate(peaks.tolist()):
        img = images[b : b + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(upsample_crm(model(img), 2)[0, c, y, x], img)
        raw = grad[0].sum(0).clamp_min(0)
        torch.testing.assert_close(prms[k], raw / raw.max(), atol=1e-5, rtol=0)


def test_an_all_zero_map_stays_zero() -> None:
    model = nn.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        model.weight.zero_()
    peaks = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]])
    for mode in MODES:
        prms = peak_response_maps(model, torch.randn(1, 3, 4, 4), peaks, mode=mode)
        assert torch.equal(prms, torch.zeros(2, 4, 4))


# ------------------------------------------------------------------------------------------------------------
# Batched == looped


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 3, None, 64])
def test_batched_equals_looped_on_the_tiny_backbone(mode: str, chunk_size: int | None) -> None:
    """Several peaks on 2 images, unevenly spread (4 + 1: two forward groups), sub-pixel factor 2."""
    model = _crm_model()
    images = torch.randn(2, 3, 48, 48)
    peaks = torch.tensor([[0, 0, 1, 2], [1, 2, 11, 0], [0, 2, 7, 7], [0, 0, 1, 2], [0, 1, 0, 11]])
    batched = peak_response_maps(model, images, peaks, sub_pixel_factor=2, mode=mode, chunk_size=chunk_size)
    looped = peak_response_maps_looped(model, images, peaks, sub_pixel_factor=2, mode=mode)
    assert batched.shape == (5, 48, 48)
    assert _max_diff(batched, looped) < 1e-5
    assert torch.equal(batched[0], batched[3])  # the same peak twice gives the same map
    assert torch.allclose(batched.amax(dim=(1, 2)), torch.ones(5))


@pytest.mark.parametrize("mode", MODES)
def test_bf16_backprop_is_close_to_fp32_and_leaves_the_model_in_fp32(mode: str) -> None:
    """`dtype=torch.bfloat16` runs on bf16 copies of the weights: fp32 maps come back, near the fp32 ones, and
    the model's own parameters and buffers keep their dtype and values. The model's own dtype changes nothing."""
    model = _crm_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 48, 48)
    peaks = torch.tensor([[0, 0, 1, 2], [1, 2, 11, 0], [0, 2, 7, 7]])
    exact = peak_response_maps(model, images, peaks, sub_pixel_factor=2, mode=mode)
    bf16 = peak_response_maps(model, images, peaks, sub_pixel_factor=2, mode=mode, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and bf16.shape == exact.shape
    assert float((bf16 - exact).abs().mean()) < 0.02
    assert torch.allclose(bf16.amax(dim=(1, 2)), torch.ones(3))
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    same = peak_response_maps(model, images, peaks, sub_pixel_factor=2, mode=mode, dtype=torch.float32)
    assert torch.equal(same, exact)


def test_the_default_chunk_grows_as_images_shrink_on_cpu_only() -> None:
    """CPU: about two 448 px images per pass (2 at 448, 8 at 224), at most 16 and at least 2; CUDA: 32."""
    assert [default_chunk_size("cpu", s * s) for s in (1024, 448, 224, 128, 16)] == [2, 2, 8, 16, 16]
    assert default_chunk_size("cuda", 128 * 128) == default_chunk_size("cuda", 448 * 448) == 32


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_looped_on_unusual_convolutions(mode: str) -> None:
    """Asymmetric 'same' padding, reflect padding, dilation, groups and a stride that drops a row."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 2, padding="same"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", groups=3),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(8, 3, 1),
    )
    images = torch.randn(2, 3, 13, 13)
    peaks = torch.tensor([[0, 0, 0, 0], [0, 2, 6, 3], [1, 1, 4, 5], [1, 0, 6, 6]])
    batched = peak_response_maps(model, images, peaks, mode=mode)
    looped = peak_response_maps_looped(model, images, peaks, mode=mode)
    assert _max_diff(batched, looped) < 1e-5
    with torch.no_grad():  # the rule's own padding gives the forward nn.Conv2d gives
        plain = model.eval()(images)
        with peak_backprop(model, mode):
            assert torch.equal(model(images), plain)


def test_batched_works_under_inference_mode() -> None:
    """A Lightning validation loop runs under inference mode, where autograd records nothing by default."""
    model = _crm_model()
    images = torch.randn(1, 3, 32, 32)
    peaks = torch.tensor([[0, 1, 2, 2], [0, 0, 1, 3]])
    expected = peak_response_maps(model, images, peaks)
    with torch.inference_mode():
        got = peak_response_maps(model, images.clone(), peaks)
    assert _max_diff(got, expected) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "ran"])
@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_looped_on_real_backbones(backbone: str, mode: str) -> None:
    """RAN's plain gradient is the exception that needs one image per forward (chunk_size=1): a batch-2
    forward differs from batch 1 in the last bits (CPU conv kernels), and that PRM moves by ~1e-3 when the
    input moves by 1e-7 (its soft masks and max-pools have kinks), the looped reference's own PRM included."""
    model = _crm_model(backbone, num_classes=4)
    images = torch.randn(2, 3, 64, 64)
    peaks = torch.tensor([[0, 0, 0, 1], [0, 3, 1, 1], [1, 2, 1, 0], [1, 1, 0, 0]])
    chunk_size = 1 if (backbone, mode) == ("ran", "gradient") else 4
    batched = peak_response_maps(model, images, peaks, mode=mode, chunk_size=chunk_size)
    looped = peak_response_maps_looped(model, images, peaks, mode=mode)
    assert _max_diff(batched, looped) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Scoped patching and side effects


def _snapshot(model: nn.Module) -> tuple[Tensor, Tensor]:
    """The model's output and input gradient for a fixed input, in its current mode."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7), requires_grad=True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


def _assert_unpatched(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks and not module.__dict__.get("forward")


@pytest.mark.parametrize("mode", MODES)
def test_patching_is_undone_after_an_exception(mode: str) -> None:
    model = _crm_model()
    model.train()
    model[0].body[1].eval()  # mixed flags must come back one by one
    flags = [m.training for m in model.modules()]
    model.eval()
    before = _snapshot(model)
    model.train()
    model[0].body[1].eval()

    with pytest.raises(RuntimeError, match="boom"), peak_backprop(model, mode):
        assert not any(m.training for m in model.modules())
        assert all(m._forward_pre_hooks for m in model.modules())  # the scope tracks which layer runs
        raise RuntimeError("boom")

    _assert_unpatched(model)
    assert [m.training for m in model.modules()] == flags
    model.eval()
    after = _snapshot(model)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_patching_is_undone_when_the_batched_path_fails() -> None:
    model = _crm_model()
    model.train()
    peaks = torch.tensor([[0, 9, 0, 0]])  # class 9 of 3: found only after the forward, inside the patch
    for fn in (peak_response_maps, peak_response_maps_looped):
        with pytest.raises(ValueError, match="outside"):
            fn(model, torch.randn(1, 3, 32, 32), peaks)
        _assert_unpatched(model)
        assert all(m.training for m in model.modules())


def test_the_forward_is_unchanged_inside_the_context() -> None:
    model = _crm_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with peak_backprop(model, "probability"):
            patched = model(x)
    assert torch.equal(plain, patched)


@pytest.mark.parametrize("mode", MODES)
def test_the_batched_path_computes_no_weight_gradient(mode: str) -> None:
    """Gradient hooks on every parameter fire whenever autograd computes that parameter's gradient."""
    model = _crm_model()
    fired: list[str] = []
    handles = [p.register_hook(lambda g, n=name: fired.append(n)) for name, p in model.named_parameters()]
    images = torch.randn(2, 3, 32, 32)
    peaks = torch.tensor([[0, 0, 1, 1], [1, 2, 3, 0]])
    peak_response_maps(model, images, peaks, mode=mode)
    assert fired == []
    assert all(p.grad is None for p in model.parameters())
    # The official loop does compute them (BN's at least, every conv's in gradient mode), and puts .grad back.
    peak_response_maps_looped(model, images, peaks, mode=mode)
    assert fired
    assert all(p.grad is None for p in model.parameters())
    for h in handles:
        h.remove()


def test_bad_arguments() -> None:
    model = _crm_model()
    images = torch.randn(1, 3, 32, 32)
    assert peak_response_maps(model, images, torch.zeros(0, 4, dtype=torch.long)).shape == (0, 32, 32)
    with pytest.raises(ConfigError, match="prm.mode"):
        peak_response_maps(model, images, torch.zeros(0, 4, dtype=torch.long), mode="excitation")
    with pytest.raises(ValueError, match="batch indices"):
        peak_response_maps(model, images, torch.tensor([[1, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        peak_response_maps(model, images, torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match="chunk_size"):
        peak_response_maps(model, images, torch.tensor([[0, 0, 0, 0]]), chunk_size=0)


# ------------------------------------------------------------------------------------------------------------
# Every convolution a trunk runs: layers that call F.conv2d themselves, TF "SAME" padding, refused ops


class _PadThenConv(nn.Conv2d):
    """timm's `Conv2dSame` pattern: TF "SAME" zero padding (the odd pixel at the end) by `F.pad`, then `F.conv2d`
    with no padding, bypassing `nn.Conv2d`'s own call."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for n, k, s in (
            (x.shape[-1], self.kernel_size[1], self.stride[1]),
            (x.shape[-2], self.kernel_size[0], self.stride[0]),
        ):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


class _StaticPadConv(nn.Module):
    """`efficientnet_pytorch`'s static-padding pattern: an `nn.ZeroPad2d` module, then `F.conv2d`."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, pads: tuple[int, int, int, int], groups: int = 1):
        super().__init__()
        self.static_padding = nn.ZeroPad2d(pads)
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, k, k) * 0.5)
        self.stride, self.groups = stride, groups

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(self.static_padding(x), self.weight, None, self.stride, 0, 1, self.groups)


def _functional_conv_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(
        _PadThenConv(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        _StaticPadConv(8, 8, 5, 2, (1, 2, 1, 2), groups=8),  # depthwise, stride 2, asymmetric
        nn.ReLU(),
        _PadThenConv(8, 4, 1),
    )


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_looped_on_layers_that_call_conv2d_themselves(mode: str) -> None:
    model = _functional_conv_model()
    images = torch.randn(2, 3, 21, 26)
    peaks = torch.tensor([[0, 0, 0, 0], [0, 3, 4, 5], [1, 1, 2, 3], [1, 2, 4, 0]])  # on the 5x6 grid
    batched = peak_response_maps(model, images, peaks, mode=mode)
    looped = peak_response_maps_looped(model, images, peaks, mode=mode)
    assert _max_diff(batched, looped) < 1e-5
    with torch.no_grad():  # the forward is the model's own
        plain = model.eval()(images)
        with peak_backprop(model, mode):
            torch.testing.assert_close(model(images), plain, rtol=0, atol=0)


def test_a_zero_pad_before_a_conv_counts_as_that_convs_padding() -> None:
    """With an odd kernel at stride 1, TF "SAME" is symmetric: a pad-then-conv layer must give exactly the PRM of an
    `nn.Conv2d(padding=1)` with the same weights. Had the rule seen the pad as part of the input, the padded zeros
    would count in `m` and in Z (their shifted value is -m > 0 for an input with negative values)."""
    torch.manual_seed(2)
    same = _PadThenConv(3, 2, 3)
    plain = nn.Conv2d(3, 2, 3, padding=1)
    plain.load_state_dict(same.state_dict())
    images = torch.randn(1, 3, 9, 9)  # negative values: m < 0
    peaks = torch.tensor([[0, 0, 0, 0], [0, 1, 8, 4]])
    for fn in (peak_response_maps, peak_response_maps_looped):
        torch.testing.assert_close(fn(same, images, peaks), fn(plain, images, peaks), rtol=0, atol=1e-6)


def test_a_convolution_the_rule_does_not_cover_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2))
    images, peaks = torch.randn(1, 3, 8, 8), torch.tensor([[0, 1, 3, 3]])
    for fn in (peak_response_maps, peak_response_maps_looped):
        with pytest.raises(ConfigError, match=r"layer '1' runs conv_transpose2d, which PRM's rule does not cover"):
            fn(model, images, peaks, mode="probability")
        _assert_unpatched(model)
    gradient = peak_response_maps(model, images, peaks, mode="gradient")  # the plain gradient needs no rule
    assert _max_diff(gradient, peak_response_maps_looped(model, images, peaks, mode="gradient")) < 1e-5


def test_calls_outside_the_model_are_not_intercepted() -> None:
    """Inside `peak_backprop`, the caller's own convolutions keep their ordinary gradient."""
    model = nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    blur = torch.ones(3, 1, 3, 3) / 9
    with peak_backprop(model, "probability"):
        y = nn.functional.conv2d(x, blur, padding=1, groups=3)  # not the model's: plain autograd
        (grad,) = torch.autograd.grad(y.sum(), x)
    (expected,) = torch.autograd.grad(nn.functional.conv2d(x, blur, padding=1, groups=3).sum(), x)
    assert torch.equal(grad, expected)


def test_bf16_strided_depthwise_backward_runs_in_fp32_and_matches() -> None:
    """The fp32 detour for strided grouped layers in bf16 gives the bf16 kernel's answer (to bf16 precision)."""
    from ranprm.prm.backprop import _input_gradient

    torch.manual_seed(4)
    grad, weight = torch.randn(2, 8, 5, 5), torch.rand(8, 1, 3, 3)
    call = ((2, 2), (1, 1), (1, 1), 8)
    exact = _input_gradient(grad, weight, call, (0, 0), None)
    fast = _input_gradient(grad.bfloat16(), weight.bfloat16(), call, (0, 0), None)
    direct = nn.functional.conv_transpose2d(grad.bfloat16(), weight.bfloat16(), None, 2, 1, 0, 8)
    assert fast.dtype == torch.bfloat16 and fast.shape == exact.shape == (2, 8, 9, 9)
    torch.testing.assert_close(fast.float(), exact, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.float(), direct.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "options", "mode"),
    [
        ("efficientnet_lite0", {}, "probability"),  # timm tf_: Conv2dSame, depthwise, BatchNormAct2d, ReLU6
        ("efficientnet_lite0", {}, "gradient"),
        ("efficientnet_lite0", {"attention": [8, 16], "attention_init": "ran"}, "probability"),
        ("timm", {"model": "resnet18"}, "probability"),
        ("resnet50", {"output_stride": 16, "attention": [16]}, "probability"),
    ],
)
def test_batched_equals_looped_on_every_family(backbone: str, options: dict, mode: str) -> None:
    pytest.importorskip("timm")
    model = _crm_model(backbone, num_classes=4, **options)
    images = torch.randn(2, 3, 64, 64)
    peaks = torch.tensor([[0, 0, 0, 1], [0, 3, 1, 1], [1, 2, 1, 0], [1, 1, 0, 0]])
    batched = peak_response_maps(model, images, peaks, mode=mode, chunk_size=4)
    looped = peak_response_maps_looped(model, images, peaks, mode=mode)
    assert _max_diff(batched, looped) < 1e-5
