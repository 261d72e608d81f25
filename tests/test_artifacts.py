from __future__ import annotations

import json
import warnings

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


# --------------------------------------------------------------------------------------------
# integrity (format version 2, issue 12); the random-damage survey is tests/test_damage.py


def test_model_digest_covers_weights_names_shapes_and_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    artifacts.save_model(p, _model().state_dict(), _meta(eps=0.1))
    data = p.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[8:header_end].decode()
    assert '\\"digest\\": \\"sha256:' in header and artifacts.read_model_meta(p)["eps"] == 0.1
    assert "digest" not in artifacts.load_model_state(p)[1]
    changes = {
        "metadata value": lambda b: b.replace(b'\\"eps\\": 0.1', b'\\"eps\\": 0.7'),
        "tensor shape": lambda b: b.replace(b'"shape":[4,1,3,3]', b'"shape":[4,1,9,1]'),
        "tensor name": lambda b: b.replace(b'"conv1.weight"', b'"conv1.weighu"'),
        "weight byte": lambda b: b[:header_end + 100] + bytes([b[header_end + 100] ^ 0x01]) + b[header_end + 101:],
        "digest": lambda b: b.replace(b"sha256:", b"sha256:0", 1)[:header_end] + b[header_end:],
    }
    for name, change in changes.items():
        bad = change(data)
        assert bad != data and len(bad) == len(data), name
        p.write_bytes(bad)
        with pytest.raises(ArtifactError, match=r"damaged \(checksum mismatch") as err:
            artifacts.load_model(p, produced_by="distill")
        assert str(p) in str(err.value) and "rerun `ferd distill`" in str(err.value), name


def test_model_without_its_digest_is_damaged(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "m.safetensors"
    save_file(dict(_model().state_dict()), str(p), metadata={"ferd": json.dumps(_meta(), sort_keys=True)})
    with pytest.raises(ArtifactError, match="damaged .format version 2 model without its digest"):
        artifacts.load_model(p)


def test_tensors_digest_frames_every_part():
    t = torch.arange(4, dtype=torch.float32)
    base = artifacts.tensors_digest("m", {"a": t})
    assert base.startswith("sha256:") and base == artifacts.tensors_digest("m", {"a": t.clone()})
    others = [("m ", {"a": t}), ("m", {"b": t}), ("m", {"a": t.reshape(2, 2)}), ("m", {"a": t.view(torch.int32)}),
              ("m", {"a": t, "b": t[:0]}), ("ma", {}), ("m", {"a": t[:2], "b": t[2:]})]
    assert len({base, *(artifacts.tensors_digest(m, ts) for m, ts in others)}) == len(others) + 1


def test_h5_is_checksummed_throughout(tmp_path):
    import h5py

    p = tmp_path / "pool.h5"
    arrays = {"x": np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32), "y": np.arange(40) % 4,
              "empty": np.zeros((0, 4)), "hist": np.arange(4)}
    attrs = {"params": {"eps": 0.1}, "name": "shirt é", "seed": 3, "flag": True, "empty": ""}
    artifacts.save_h5(p, kind="pool", arrays=arrays, attrs=attrs, chunk_rows=16)
    with h5py.File(p) as fh:
        assert fh.id.get_create_plist().get_version()[0] >= 2  # superblock with a checksum
        assert all(fh[name].fletcher32 and fh[name].chunks for name in fh)
        for key in fh.attrs:  # no variable-length strings: they live in the global heap, which has no checksum
            assert not h5py.check_string_dtype(fh.attrs.get_id(key).dtype) or h5py.check_string_dtype(
                fh.attrs.get_id(key).dtype).length is not None, key
    back, back_attrs = artifacts.load_h5(p, kind="pool")
    assert sorted(back) == sorted(arrays) and all(back[k].dtype == arrays[k].dtype for k in arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert back_attrs == {**attrs, "kind": "pool", "format_version": artifacts.FORMAT_VERSION}


def test_h5_damage_to_data_or_attributes_is_an_error(tmp_path):
    import h5py

    p = tmp_path / "pool.h5"
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    artifacts.save_h5(p, kind="pool", arrays={"x": x, "y": np.arange(64) % 4}, attrs={"params": {"eps": 0.1}},
                      chunk_rows=16)
    data = p.read_bytes()
    with h5py.File(p) as fh:
        chunk = fh["x"].id.get_chunk_info(2)
    cases = {
        "chunk byte": (data[:chunk.byte_offset + 7] + bytes([data[chunk.byte_offset + 7] ^ 0x04])
                       + data[chunk.byte_offset + 8:], "checksum mismatch in dataset x"),
        "attribute digit": (data.replace(b'"eps": 0.1', b'"eps": 0.7'), "metadata checksum"),
        "truncated": (data[:-100], "truncated or corrupt"),
    }
    for name, (bad, expect) in cases.items():
        assert bad != data, name
        p.write_bytes(bad)
        with pytest.raises(ArtifactError) as err:
            artifacts.load_h5(p, kind="pool")
        message = str(err.value)
        assert message.startswith(f"{p}: ") and expect in message and "rerun `ferd synth-fae`" in message, (name, message)


# --- format version 1: the writers as they were at commit 88ae8ee (no digest, no checksums)


def _save_model_v1(path, state_dict, meta):
    from safetensors.torch import save

    tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in state_dict.items()}
    path.write_bytes(save(tensors, metadata={"ferd": json.dumps({**meta, "format_version": 1}, sort_keys=True)}))


def _save_h5_v1(path, kind, arrays, attrs, chunk_rows=256):
    import h5py

    with h5py.File(path, "w", libver=("earliest", "v110"), track_order=False) as fh:
        fh.attrs["kind"] = kind
        fh.attrs["format_version"] = 1
        for key in sorted(attrs):
            value = attrs[key]
            fh.attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value, sort_keys=True)
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            kwargs = {"track_times": False}
            if arr.ndim >= 1 and arr.shape[0] > 0:
                kwargs.update(chunks=(min(chunk_rows, arr.shape[0]), *arr.shape[1:]), compression="gzip",
                              compression_opts=4, shuffle=True)
            fh.create_dataset(name, data=arr, **kwargs)


def test_version_1_artifacts_load_unverified_with_a_warning(tmp_path):
    from ferd.errors import FerdWarning

    model = _model()
    m = tmp_path / "v1.safetensors"
    _save_model_v1(m, model.state_dict(), _meta())
    with pytest.warns(FerdWarning, match=r"v1.safetensors: format version 1 model without checksums, loaded "
                                         r"unverified; rerun `ferd distill` \(or `dvc repro -f -s distill`\)"):
        state, meta = artifacts.load_model_state(m, produced_by="distill")
    assert meta["format_version"] == 1 and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    h = tmp_path / "v1.h5"
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    _save_h5_v1(h, "probe", {"x": x, "D": np.arange(4.0), "empty": np.zeros((0, 2))}, {"params": {"a": 1}, "n": "c"})
    with pytest.warns(FerdWarning, match="v1.h5: format version 1 probe without checksums.*rerun `ferd probe`"):
        arrays, attrs = artifacts.load_h5(h, kind="probe")
    assert np.array_equal(arrays["x"], x) and attrs == {"kind": "probe", "format_version": 1, "params": {"a": 1}, "n": "c"}
    artifacts.save_h5(h, kind="probe", arrays=arrays, attrs={"params": attrs["params"]})  # rewritten: version 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert artifacts.load_h5(h, kind="probe")[1]["format_version"] == 2


def test_version_1_teacher_through_the_cli_is_one_warning_line(tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app
    from tests.conftest import tiny_params, write_params

    state, meta = artifacts.load_model_state(tiny_teacher)
    v1 = tmp_path / "teacher.safetensors"
    _save_model_v1(v1, state, meta)
    params = write_params(tmp_path / "params.yaml", tiny_params())
    result = CliRunner().invoke(app, ["--params", str(params), "probe", "--teacher", str(v1), "--out", str(tmp_path / "p.h5")])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: {v1}: format version 1 model without checksums, loaded unverified; rerun `ferd "
                      "fetch-teacher` (or `dvc repro -f -s fetch-teacher`) to rewrite it with checksums"], result.stderr
    assert artifacts.load_h5(tmp_path / "p.h5", kind="probe")[1]["format_version"] == 2


def test_version_1_shape_damage_is_not_a_terabyte_allocation(tmp_path):
    """Version 1 shapes carry no checksum: a dataset claiming far more bytes than the file could hold is damage."""
    h = tmp_path / "v1.h5"
    _save_h5_v1(h, "pool", {"y": np.zeros(12345, dtype=np.int64)}, {})
    data = h.read_bytes()
    h.write_bytes(data.replace((12345).to_bytes(8, "little"), (1 << 40).to_bytes(8, "little")))
    with pytest.raises(ArtifactError, match="damaged .dataset y claims 8796093022208 bytes in a file of"):
        artifacts.load_h5(h, kind="pool")
