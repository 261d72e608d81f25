from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ferd import artifacts
from ferd.errors import ArtifactError
from ferd.models import build_model


def _meta(**extra):
    return artifacts.model_meta(arch="cnn", num_classes=4, input_shape=(1, 16, 16), mean=[0.0], std=[1.0],
                                dataset="synthetic", source="train", width=4, **extra)


def _model():
    torch.manual_seed(0)
    return build_model("cnn", num_classes=4, in_channels=1, image_size=16, width=4)


def test_model_round_trip_and_byte_stability(tmp_path):
    model = _model()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    artifacts.save_model(a, model.state_dict(), _meta(check={"clean_acc": 0.5}))
    artifacts.save_model(b, model.state_dict(), _meta(check={"clean_acc": 0.5}))
    assert a.read_bytes() == b.read_bytes()
    loaded, meta = artifacts.load_model(a)
    assert meta["arch"] == "cnn" and meta["check"] == {"clean_acc": 0.5}
    assert not loaded.training
    x = torch.rand(3, 1, 16, 16)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_truncated_and_corrupt_models(tmp_path):
    good = tmp_path / "m.safetensors"
    artifacts.save_model(good, _model().state_dict(), _meta())
    data = good.read_bytes()
    cases = {
        "empty": b"",
        "short": data[:5],
        "truncated": data[: len(data) // 2],
        "garbage_header": data[:8] + b"x" * 50 + data[58:],
        "random": bytes(range(256)) * 4,
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(ArtifactError) as err:
            artifacts.load_model(p)
        assert str(p) in str(err.value) and "rerun" in str(err.value), name


def test_missing_model_says_which_stage(tmp_path):
    with pytest.raises(ArtifactError, match="run `ferd fetch-teacher`"):
        artifacts.load_model(tmp_path / "none.safetensors")


def test_plain_safetensors_without_ferd_metadata(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ArtifactError, match="without ferd metadata"):
        artifacts.read_model_meta(p)


def test_h5_round_trip_kind_check_and_byte_stability(tmp_path):
    x = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    y = np.arange(300, dtype=np.int64) % 4
    kw = dict(kind="pool", arrays={"x": x, "y": y}, attrs={"num_classes": 4, "params": {"a": [1, 2]}})
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    artifacts.save_h5(a, **kw)
    artifacts.save_h5(b, **kw)
    assert a.read_bytes() == b.read_bytes()
    arrays, attrs = artifacts.load_h5(a, kind="pool", required=("x", "y"))
    np.testing.assert_array_equal(arrays["x"], x)
    assert attrs["params"] == {"a": [1, 2]} and attrs["num_classes"] == 4
    with pytest.raises(ArtifactError, match="where a 'probe' was expected"):
        artifacts.load_h5(a, kind="probe")
    with pytest.raises(ArtifactError, match="lacks dataset"):
        artifacts.load_h5(a, kind="pool", required=("margins",))
    broken = tmp_path / "broken.h5"
    broken.write_bytes(a.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        artifacts.load_h5(broken, kind="pool")


def test_model_where_image_set_expected_and_vice_versa(tmp_path):
    m = tmp_path / "m.safetensors"
    artifacts.save_model(m, _model().state_dict(), _meta())
    with pytest.raises(ArtifactError):
        artifacts.load_h5(m, kind="pool")
    h = tmp_path / "p.h5"
    artifacts.save_h5(h, kind="pool", arrays={"y": np.zeros(3, dtype=np.int64)}, attrs={})
    with pytest.raises(ArtifactError, match="expected a ferd model"):
        artifacts.load_model(h)


def test_json_and_csv(tmp_path):
    artifacts.save_json(tmp_path / "m.json", {"b": 1, "a": 0.5})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 0.5,\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        artifacts.save_json(tmp_path / "nan.json", {"a": float("nan")})
    assert not (tmp_path / "nan.json").exists()
    artifacts.save_csv(tmp_path / "c.csv", [{"cls": "a", "acc": 1 / 3}], ["cls", "acc"])
    assert (tmp_path / "c.csv").read_text() == "cls,acc\na,0.333333\n"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifacts.load_json(tmp_path / "bad.json")


def test_failed_write_leaves_previous_artifact(tmp_path):
    p = tmp_path / "m.json"
    artifacts.save_json(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.json"]


def test_describe(tmp_path):
    m = tmp_path / "m.safetensors"
    artifacts.save_model(m, _model().state_dict(), _meta())
    desc = artifacts.describe(m)
    assert desc["format"] == "safetensors" and desc["meta"]["arch"] == "cnn"
    assert desc["entries"]["conv1.weight"]["shape"] == [4, 1, 3, 3]
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ArtifactError, match="not a ferd artifact"):
        artifacts.describe(tmp_path / "x.bin")
