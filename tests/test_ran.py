"""Residual Attention Network backbone: sizes, soft masks, parameter counts, the two mask-gradient paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ranprm.models.backbones  # noqa: F401  (registers the backbones)
from ranprm.cli.config import compose
from ranprm.errors import CheckpointError, ConfigError, DataError
from ranprm.models.backbones.ran import AttentionModule, ResidualAttentionNet
from ranprm.models.registry import available_backbones, build_backbone

TINY = {"width": 8, "modules_per_stage": (1, 1, 1)}  # same graph, 256 output channels, ~0.5M parameters


def tiny_ran(**overrides: object) -> ResidualAttentionNet:
    return build_backbone("ran", **{**TINY, **overrides})


@pytest.mark.parametrize("size", [(448, 448), (321, 500), (97, 131), (64, 64), (32, 33)])
def test_tiny_ran_output_is_ceil_of_input_over_32(size: tuple[int, int]) -> None:
    net = tiny_ran().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size))
    assert out.shape == (1, net.out_channels, math.ceil(size[0] / 32), math.ceil(size[1] / 32))
    assert net.out_channels == 256 and net.stride == 32


def test_real_ran_at_64_px() -> None:
    net = build_backbone("ran").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2048, 2, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "reference"), [("ran", 29.8e6), ("ran92", 50.5e6)])
def test_parameter_counts_match_the_paper_without_classifier(name: str, reference: float) -> None:
    with torch.device("meta"):  # no memory, no init cost
        net = build_backbone(name)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - reference) / reference < 0.03, count


def test_attention_maps_one_per_module_in_unit_range_at_module_resolution() -> None:
    net = tiny_ran(modules_per_stage=(1, 2, 1)).eval()
    images = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        features, maps = net.forward_with_attention(images)
        plain = net(images)
    torch.testing.assert_close(features, plain)
    strides = [4, 8, 8, 16]  # stage of each module, in forward order
    assert [tuple(m.shape) for m in maps] == [(2, math.ceil(97 / s), math.ceil(131 / s)) for s in strides]
    for m in maps:
        assert m.min() >= 0 and m.max() <= 1


def test_plain_forward_does_not_collect_attention_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    original = AttentionModule.forward

    def spy(self: AttentionModule, x: torch.Tensor, attention_maps: list[torch.Tensor] | None = None):
        seen.append(attention_maps)
        return original(self, x, attention_maps)

    monkeypatch.setattr(AttentionModule, "forward", spy)
    with torch.no_grad():
        tiny_ran().eval()(torch.randn(1, 3, 64, 64))
    assert seen == [None, None, None]


def _grads_after_backward(net: ResidualAttentionNet) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    net.zero_grad(set_to_none=True)
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    net(images).sum().backward()
    assert images.grad is not None
    return {name: p.grad for name, p in net.named_parameters()}, images.grad


def _is_mask_param(name: str) -> bool:
    return ".mask." in name


def _mask_grads(grads: dict[str, torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients of the soft-mask branches' parameters; never empty, so `all(...)` over it means something."""
    found = [g for name, g in grads.items() if _is_mask_param(name)]
    assert found, "no parameter of a mask branch found: the name filter no longer matches the model"
    return found


def test_detached_masks_get_no_gradient_while_the_trunk_does() -> None:
    grads, _ = _grads_after_backward(tiny_ran(mask_grad="detached").train())
    mask_names = [n for n in grads if _is_mask_param(n)]
    assert mask_names and all(grads[n] is None for n in mask_names)
    trunk_names = [n for n in grads if ".trunk." in n]
    assert trunk_names and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trunk_names)


def test_full_masks_get_a_gradient() -> None:
    grads, _ = _grads_after_backward(tiny_ran(mask_grad="full").train())
    assert all(g is not None and g.abs().sum() > 0 for g in _mask_grads(grads))


def test_mask_grad_switches_on_a_built_model_without_changing_the_output() -> None:
    net = tiny_ran().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full_out = net(images)
    assert net.mask_grad == "full"
    net.set_mask_grad("detached")
    assert net.mask_grad == "detached"
    assert all(m.mask_grad == "detached" for m in net.attention_modules())
    grads, _ = _grads_after_backward(net)
    assert all(g is None for g in _mask_grads(grads))
    with torch.no_grad():
        torch.testing.assert_close(net(images), full_out)
    net.mask_grad = "full"  # the property setter reaches every module too
    grads, _ = _grads_after_backward(net)
    assert all(g is not None and g.abs().sum() > 0 for g in _mask_grads(grads))
    with pytest.raises(ConfigError, match="mask_grad"):
        net.set_mask_grad("half")


def test_inputs_below_32_px_raise_a_one_line_data_error() -> None:
    with pytest.raises(DataError, match=r"31x64 px.*at least 32") as info:
        tiny_ran()(torch.randn(1, 3, 31, 64))
    assert "\n" not in str(info.value)


def test_registry_and_composed_defaults_build_the_real_architectures() -> None:
    assert {"ran", "ran92"} <= set(available_backbones())
    for name, modules in (("ran", (1, 1, 1)), ("ran92", (1, 2, 3))):
        cfg = OmegaConf.to_container(compose("train", [f"backbone={name}"]).backbone)
        assert isinstance(cfg, dict)
        with torch.device("meta"):
            net = build_backbone(cfg.pop("name"), **cfg)
        assert isinstance(net, ResidualAttentionNet)
        assert (net.out_channels, net.stride, net.modules_per_stage) == (2048, 32, modules)
        assert net.mask_grad == "full"
        assert len(net.attention_modules()) == sum(modules)


def test_bad_options_raise_one_line_errors() -> None:
    with pytest.raises(CheckpointError, match="backbone 'ran' has no ImageNet weights"):
        build_backbone("ran", pretrained="imagenet")
    with pytest.raises(ConfigError, match="modules_per_stage"):
        build_backbone("ran", width=8, modules_per_stage=(1, 1))
    with pytest.raises(ConfigError, match="width"):
        build_backbone("ran", width=6)


def test_pretrained_file_round_trip(tmp_path: Path) -> None:
    source = tiny_ran()
    path = tmp_path / "ran_tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = tiny_ran(pretrained=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_backbone("ran", width=8, modules_per_stage=(1, 2, 1), pretrained=str(path))


def test_tiny_ran_trains_and_its_mask_grad_switches_afterwards() -> None:
    """30 SGD steps of tiny RAN + class conv fit 4 images; then detach masks at inference.

    Measured with 1 and 2 threads: the loss falls from 0.698 to 0.0066 / 0.0058, so the 10x bar holds with a wide
    margin whatever the kernels' summation order (12 steps gave 0.37 / 0.24: too close to a bar to be a test)."""
    backbone = tiny_ran().train()
    classifier = torch.nn.Conv2d(backbone.out_channels, 3, 1)
    params = [*backbone.parameters(), *classifier.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    images = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    loss_fn = torch.nn.MultiLabelSoftMarginLoss()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(classifier(backbone(images)).mean(dim=(2, 3)), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses

    backbone.eval().set_mask_grad("detached")
    optimizer.zero_grad(set_to_none=True)
    images.requires_grad_(True)
    crm, maps = backbone.forward_with_attention(images)
    classifier(crm)[0, 0].max().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(g is None for g in _mask_grads({n: p.grad for n, p in backbone.named_parameters()}))
    assert len(maps) == 3


def test_predictions_carry_each_images_attention_maps_from_the_same_forward() -> None:
    """`predict_batch(with_attention=True)` gives image b the b-th row of every module's mask; without it,
    and for backbones without attention, the list is empty."""
    from ranprm.models.prm_net import PRMNet
    from ranprm.prm.pipeline import InferenceConfig, predict_batch

    torch.manual_seed(0)
    model = PRMNet(tiny_ran(), num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    mean = {"kind": "mean"}
    cfg = InferenceConfig.from_config({"classes": mean, "peaks": mean}, {"stimulation": False, "peak_filter": "none"},
                                      {}, {"name": "prm_only"})  # fmt: skip

    with torch.no_grad():
        _, expected = model.forward_with_attention(images)
    with_maps = predict_batch(model, images, [(64, 64)] * 2, cfg, with_attention=True)
    assert len(expected) == 3
    for b, prediction in enumerate(with_maps):
        assert len(prediction.attention) == 3
        for got, want in zip(prediction.attention, expected, strict=True):
            torch.testing.assert_close(got, want[b])
    assert all(p.attention == [] for p in predict_batch(model, images, [(64, 64)] * 2, cfg))
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, stride=32, padding=1))
    assert all(p.attention == [] for p in predict_batch(plain, images, [(64, 64)] * 2, cfg, with_attention=True))
