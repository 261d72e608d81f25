"""The model registry (ferd.models): shapes, the FERD feature split, normalisation, reference
state-dict layouts, checkpoint adaptation, the generator, and registry errors."""

from __future__ import annotations

import pytest
import torch

from ferd.config import ARCHITECTURES
from ferd.errors import ConfigError, SourceError
from ferd.models import (
    ARCH_REGISTRY,
    FerdNet,
    adapt_state_dict,
    build_generator,
    build_model,
    list_architectures,
    reset_generator,
)

HEAVY = {"wrn34_10", "wrn34_20"}
LIGHT = [a for a in ARCHITECTURES if a not in HEAVY]


def _build(arch: str, in_channels: int, image_size: int, num_classes: int = 7, **kw) -> FerdNet:
    torch.manual_seed(0)
    return build_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)


def _check_forward(model: FerdNet, x: torch.Tensor, num_classes: int) -> None:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        z = model.forward_features(x)
        split = model.forward_head(z)
    assert logits.shape == (x.shape[0], num_classes)
    assert z.dim() == 4 and z.shape[0] == x.shape[0]
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, split)


@pytest.mark.parametrize("arch", LIGHT)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_light_archs_forward_and_split(arch, channels, size):
    model = _build(arch, channels, size)
    assert isinstance(model, FerdNet)
    _check_forward(model, torch.rand(2, channels, size, size), 7)


@pytest.mark.parametrize("arch", LIGHT)
def test_light_archs_train_mode_backward_small_input(arch):
    model = _build(arch, 3, 8, num_classes=3).train()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("arch", sorted(HEAVY))
def test_wide_resnets_forward_and_split(arch):
    _check_forward(_build(arch, 3, 32, num_classes=10), torch.rand(1, 3, 32, 32), 10)
    _check_forward(_build(arch, 1, 16, num_classes=5), torch.rand(1, 1, 16, 16), 5)


def test_registry_matches_config():
    assert set(ARCH_REGISTRY) == set(ARCHITECTURES)
    assert list_architectures() == sorted(ARCHITECTURES)


def test_feature_split_is_pre_relu_for_preact_nets():
    # Z is the final BatchNorm output before its ReLU: it must have negative entries.
    for arch in ("preactresnet18", "mobilenetv2", "cnn"):
        model = _build(arch, 3, 16).eval()
        with torch.no_grad():
            z = model.forward_features(torch.rand(2, 3, 16, 16))
        assert (z < 0).any(), arch
    model = _build("resnet18", 3, 16).eval()  # post-activation: Z after the last ReLU
    with torch.no_grad():
        assert (model.forward_features(torch.rand(2, 3, 16, 16)) >= 0).all()


def test_cnn_width_and_keys():
    model = _build("cnn", 1, 28, num_classes=10, width=8)
    keys = {k.rsplit(".", 1)[0] for k in model.state_dict()}
    assert keys == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "bn4", "fc"}
    assert model.conv1.out_channels == 8 and model.conv4.out_channels == 16
    assert model.fc.in_features == 16 * 9
    assert model.conv1.bias is None


@pytest.mark.parametrize("arch", ["cnn", "resnet8"])
def test_normalisation_inside_model(arch):
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    normed = _build(arch, 3, 16, mean=mean, std=std).eval()
    plain = _build(arch, 3, 16).eval()
    plain.load_state_dict(normed.state_dict())
    assert not any(k in ("mean", "std") for k in normed.state_dict())
    x = torch.rand(2, 3, 16, 16)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - m) / s))


def test_normalisation_scalar_broadcast_and_bad_values():
    model = _build("cnn", 3, 16, mean=(0.5,), std=(0.25,))
    assert model.mean.shape == (1, 3, 1, 1) and torch.allclose(model.std, torch.full((1, 3, 1, 1), 0.25))
    with pytest.raises(ConfigError, match="teacher.mean"):
        _build("cnn", 3, 16, mean=(0.5, 0.5), std=(0.2, 0.2))


def test_kuangliu_and_robustbench_key_layouts():
    expect = {
        "resnet18": [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv1.weight",
            "layer2.0.shortcut.0.weight",
            "layer2.0.shortcut.1.running_mean",
            "layer4.1.bn2.weight",
            "linear.weight",
            "linear.bias",
        ],
        "preactresnet18": [
            "conv1.weight",
            "layer1.0.bn1.weight",
            "layer2.0.shortcut.0.weight",
            "layer4.1.conv2.weight",
            "bn.weight",
            "bn.running_mean",
            "linear.weight",
        ],
        "mobilenetv2": [
            "conv1.weight",
            "bn1.weight",
            "layers.0.conv1.weight",
            "layers.0.shortcut.0.weight",
            "layers.0.shortcut.1.weight",
            "layers.16.bn3.weight",
            "conv2.weight",
            "bn2.weight",
            "linear.weight",
        ],
        "resnet20": [
            "conv1.weight",
            "bn1.weight",
            "layer1.2.conv2.weight",
            "layer3.0.shortcut.0.weight",
            "linear.weight",
        ],
    }
    for arch, keys in expect.items():
        sd = _build(arch, 3, 32).state_dict()
        for key in keys:
            assert key in sd, (arch, key)
    pre = _build("preactresnet18", 3, 32).state_dict()
    assert "layer1.0.shortcut.0.weight" not in pre and "layer2.0.shortcut.1.weight" not in pre
    assert not any(k.startswith("layers.17") for k in _build("mobilenetv2", 3, 32).state_dict())


def test_robustbench_wrn_key_layout():
    model = _build("wrn34_10", 3, 32, num_classes=10)
    sd = model.state_dict()
    for key in [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.convShortcut.weight",
        "block1.layer.4.conv2.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.4.bn2.running_var",
        "bn1.weight",
        "bn1.running_mean",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in sd, key
    assert "block1.layer.1.convShortcut.weight" not in sd
    assert sd["fc.weight"].shape == (10, 640) and sd["block3.layer.0.conv1.weight"].shape == (640, 320, 3, 3)
    assert sum(p.numel() for p in model.parameters()) == 46_160_474  # WRN-34-10 as in RobustBench


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_adapt_state_dict_round_trips_wrappers_and_prefixes():
    model = _build("resnet8", 3, 16)
    sd = model.state_dict()
    _same(adapt_state_dict(sd, model), sd)
    _same(adapt_state_dict({f"module.{k}": v for k, v in sd.items()}, model), sd)
    _same(adapt_state_dict({"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 91.0, "epoch": 3}, model), sd)
    _same(adapt_state_dict({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, model), sd)
    _same(adapt_state_dict({"model": dict(sd)}, model), sd)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    out = adapt_state_dict(half, model)
    assert all(v.dtype == torch.float32 for v in out.values() if v.is_floating_point())
    assert out["bn1.num_batches_tracked"].dtype == torch.long
    no_nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(adapt_state_dict(no_nbt, model))  # old checkpoints lack these buffers


def test_adapt_state_dict_drops_trades_sub_block():
    model = _build("cnn", 1, 16, width=4)
    sd = model.state_dict()
    extra = dict(sd)
    extra["sub_block1.layer.0.bn1.weight"] = torch.ones(4)
    extra["module.sub_block1.layer.0.conv1.weight"] = torch.ones(4, 4, 3, 3)
    out = adapt_state_dict({"state_dict": extra}, model)
    _same(out, sd)
    fresh = _build("cnn", 1, 16, width=4)
    fresh.load_state_dict(out)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_adapt_state_dict_rejects_wrong_arch():
    wrong = _build("resnet8", 3, 16).state_dict()
    with pytest.raises(SourceError, match="teacher.arch") as info:
        adapt_state_dict(wrong, _build("resnet20", 3, 16))
    msg = str(info.value)
    assert "\n" not in msg and "missing" in msg and "layer1.1" in msg
    with pytest.raises(SourceError, match="mis-shaped"):
        adapt_state_dict(_build("cnn", 1, 16, width=8).state_dict(), _build("cnn", 1, 16, width=16))
    with pytest.raises(SourceError, match="unexpected"):
        adapt_state_dict({**_build("cnn", 1, 16).state_dict(), "extra.weight": torch.zeros(1)}, _build("cnn", 1, 16))
    with pytest.raises(SourceError, match="teacher.arch"):
        adapt_state_dict([1, 2, 3], _build("cnn", 1, 16))


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (28, 1), (32, 3), (30, 3)])
def test_generator_shape_and_range(size, channels):
    gen = build_generator(nz=16, ngf=8, image_size=size, channels=channels)
    reset_generator(gen, torch.Generator().manual_seed(0))
    out = gen(torch.randn(3, 16))
    assert out.shape == (3, channels, size, size)
    assert out.min() >= 0 and out.max() <= 1
    out.mean().backward()
    assert gen.l1.weight.grad is not None


def test_reset_generator_deterministic():
    def params(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        gen = build_generator(nz=10, ngf=4, image_size=8, channels=1)
        reset_generator(gen, torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in gen.parameters()]

    a, b, c = params(1), params(1), params(2)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    gen = build_generator(nz=10, ngf=4, image_size=8, channels=1)
    reset_generator(gen, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(gen.l1.weight.std()) == pytest.approx(0.02, rel=0.2)
        assert float(gen.l1.bias.abs().max()) == 0.0
        bn = gen.conv_blocks[0]
        assert float((bn.weight - 1).abs().max()) < 0.2 and float(bn.bias.abs().max()) == 0.0


def test_conditional_generator_uses_the_label_and_needs_it():
    gen = build_generator(nz=10, ngf=4, image_size=8, channels=1, num_classes=3)
    reset_generator(gen, torch.Generator().manual_seed(0))
    gen.eval()  # BN on running statistics: each row's image depends on that row only
    z = torch.randn(1, 10).expand(3, 10)
    out = gen(z, torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 8, 8)
    # same z, different labels -> different images; same z and label -> the same image
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    torch.testing.assert_close(gen(z[:1], torch.tensor([1])), out[1:2], rtol=0, atol=0)
    # the embedding is drawn like z (N(0, 1)), from the seed
    assert float(gen.embed.weight.detach().std()) == pytest.approx(1.0, rel=0.5)
    out.sum().backward()
    assert gen.embed.weight.grad is not None and gen.embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs labels"):
        gen(z)
    with pytest.raises(ValueError, match="needs labels"):
        gen(z, torch.tensor([0, 1]))
    # unconditional: unchanged layout (no embedding, l1 reads nz inputs) and draws
    plain = build_generator(nz=10, ngf=4, image_size=8, channels=1)
    assert plain.embed is None and plain.l1.in_features == 10 and gen.l1.in_features == 20


def test_unknown_arch_suggests_closest():
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet-18", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="wrn34_10"):
        build_model("wrn34-10", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="image_size"):
        build_model("cnn", num_classes=10, in_channels=1, image_size=2)
