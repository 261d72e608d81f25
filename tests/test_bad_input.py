"""Bad input, through the command line: one ``error:`` line on stderr, exit code 1, no traceback, no output.

Every case builds one broken input (artifact, params, teacher source, dataset location), runs one
stage with CliRunner and checks the contract of ``stages/_ui.py:handles_errors``:

- exit code 1, raised as ``SystemExit`` (CliRunner turns an uncaught exception into exit code 1
  too, so the exception type is checked, and no ``Traceback`` may appear);
- exactly one stderr line starting with ``error:``, the last one, naming what is wrong (the
  case's ``expect`` substrings) and what to do;
- every output the stage would write is absent afterwards, or byte-identical to what was there
  before (``keep=True`` cases put a previous version in place first), and no temp file is left.

The upstream artifacts (teacher, probe, class weights, pool) come from one run of the first four
stages of the tiny chain (module fixture); each case copies or mangles them inside its own tmp_path.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ferd.artifacts import load_h5, load_model_state, save_h5, save_model
from stages.cli import app
from tests.conftest import tiny_params, write_params
from tests.test_stages import CHAIN, OUTPUTS

runner = CliRunner()

TEACHER, PROBE, WEIGHTS, POOL = OUTPUTS[:4]
SENTINEL = b"previous complete version\n"
_LISTENERS: list[socket.socket] = []  # sockets of the never-answering server, closed after the module


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """teacher, probe, class weights and pool of the tiny setting, written by the first four stages."""
    root = tmp_path_factory.mktemp("upstream")
    write_params(root / "params.yaml", tiny_params())
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in CHAIN[:4]:
            result = runner.invoke(app, [stage])
            assert result.exit_code == 0, f"{stage}:\n{result.output}"
    finally:
        os.chdir(cwd)
    return root


@dataclass
class Run:
    """One CLI invocation: the params (a mapping, raw YAML text, or None for none at all), the stage
    arguments, the outputs that must not appear, and what the error line must say."""

    args: list[str]
    outputs: list[Path]
    expect: list[str]
    forbid: list[str] = field(default_factory=list)  # must not appear in the error line
    params: dict[str, Any] | str | None = field(default_factory=tiny_params)
    keep: bool = False  # put a previous version of every output in place first
    max_seconds: float | None = None
    patches: list[tuple[Any, str, Any]] = field(default_factory=list)  # (object, attribute, value)


@dataclass
class Env:
    tmp: Path
    upstream: Path

    def path(self, name: str) -> Path:
        return self.upstream / name

    @property
    def out(self) -> Path:
        d = self.tmp / "out"
        d.mkdir(exist_ok=True)
        return d


CASES: dict[str, Callable[[Env], Run]] = {}
XFAIL: dict[str, str] = {}  # case -> what the fix needs (a file this work may not touch)


def case(func: Callable[[Env], Run]) -> Callable[[Env], Run]:
    CASES[func.__name__.removeprefix("case_").replace("_", "-")] = func
    return func


# --------------------------------------------------------------------------------------------
# helpers building broken inputs


def _probe(env: Env, teacher: Path, **kw: Any) -> Run:
    out = env.out / "probe.h5"
    return Run(["probe", "--teacher", str(teacher), "--out", str(out)], [out], **kw)


def _gen_utae(env: Env, pool: Path, teacher: Path | None = None, **kw: Any) -> Run:
    out, hist = env.out / "utae.h5", env.out / "utae_targets.csv"
    args = ["gen-utae", "--teacher", str(teacher or env.path(TEACHER)), "--pool", str(pool), "--out", str(out),
            "--hist", str(hist)]
    return Run(args, [out, hist], **kw)


def _distill(env: Env, pool: Path | None = None, **kw: Any) -> Run:
    out, log = env.out / "student.safetensors", env.out / "distill.csv"
    args = ["distill", "--teacher", str(env.path(TEACHER)), "--pool", str(pool or env.path(POOL)),
            "--utae", str(env.tmp / "no-utae.h5"), "--probe", str(env.path(PROBE)), "--out", str(out), "--log", str(log)]
    return Run(args, [out, log], **kw)


def _fetch(env: Env, teacher: dict[str, Any] | None = None, data: dict[str, Any] | None = None, **kw: Any) -> Run:
    base = tiny_params()
    params = tiny_params(teacher={**base["teacher"], **(teacher or {})}, data={**base["data"], **(data or {})})
    out = env.out / "teacher.safetensors"
    return Run(["fetch-teacher", "--out", str(out)], [out], params=params, **kw)


def _config(env: Env, params: dict[str, Any] | str, expect: list[str]) -> Run:
    """A params problem: probe with a good teacher must refuse before doing anything."""
    return _probe(env, env.path(TEACHER), params=params, expect=expect)


def _section(name: str, **values: Any) -> dict[str, Any]:
    """tiny_params with ``values`` merged into section ``name``."""
    base = tiny_params()
    return tiny_params(**{name: {**base[name], **values}})


def _synthetic(**values: Any) -> dict[str, Any]:
    base = tiny_params()
    return tiny_params(data={**base["data"], "synthetic": {**base["data"]["synthetic"], **values}})


def _truncated(src: Path, dest: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def _random_bytes(dest: Path, size: int = 4096, seed: int = 0) -> Path:
    dest.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return dest


def _pool_variant(env: Env, name: str, change: Callable[[dict, dict], None]) -> Path:
    """The upstream pool rewritten with ``change(arrays, attrs)`` applied."""
    arrays, attrs = load_h5(env.path(POOL), kind="pool")
    change(arrays, attrs)
    attrs = {k: v for k, v in attrs.items() if k not in ("kind", "format_version")}
    dest = env.tmp / name
    save_h5(dest, kind="pool", arrays=arrays, attrs=attrs)
    return dest


def _model_variant(env: Env, name: str, **meta_changes: Any) -> Path:
    """A copy of the teacher artifact with changed metadata (weights unchanged)."""
    state, meta = load_model_state(env.path(TEACHER))
    meta.update(meta_changes)
    dest = env.tmp / name
    save_model(dest, state, meta)
    return dest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# model artifacts (probe --teacher)


@case
def case_teacher_truncated(env: Env) -> Run:
    bad = _truncated(env.path(TEACHER), env.tmp / "t.safetensors", 0.6)
    return _probe(env, bad, expect=[str(bad), "truncated", "rerun"])


@case
def case_teacher_truncated_to_header(env: Env) -> Run:
    bad = env.tmp / "t.safetensors"
    bad.write_bytes(env.path(TEACHER).read_bytes()[:5])
    return _probe(env, bad, expect=[str(bad), "truncated", "rerun"])


@case
def case_teacher_random_bytes(env: Env) -> Run:
    bad = _random_bytes(env.tmp / "t.safetensors")
    return _probe(env, bad, expect=[str(bad), "corrupt", "rerun"])


@case
def case_teacher_corrupt_header(env: Env) -> Run:
    data = bytearray(env.path(TEACHER).read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header's first bytes
    bad = env.tmp / "t.safetensors"
    bad.write_bytes(bytes(data))
    return _probe(env, bad, expect=[str(bad), "corrupt", "rerun"])


@case
def case_teacher_is_a_pool(env: Env) -> Run:
    return _probe(env, env.path(POOL), expect=[POOL, "expected a ferd model"])


@case
def case_teacher_is_a_pool_renamed(env: Env) -> Run:
    bad = env.tmp / "pool.safetensors"
    bad.write_bytes(env.path(POOL).read_bytes())
    return _probe(env, bad, expect=[str(bad), "corrupt", "rerun"])


@case
def case_teacher_without_ferd_metadata(env: Env) -> Run:
    from safetensors.torch import save_file

    bad = env.tmp / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(bad))
    return _probe(env, bad, expect=[str(bad), "without ferd metadata", "fetch-teacher"])


@case
def case_teacher_unknown_arch_in_metadata(env: Env) -> Run:
    bad = _model_variant(env, "t.safetensors", arch="resnet99")
    return _probe(env, bad, expect=[str(bad), "resnet99", "rerun"])


@case
def case_teacher_weights_do_not_match_metadata(env: Env) -> Run:
    bad = _model_variant(env, "t.safetensors", width=8)  # the weights are width 4
    return _probe(env, bad, expect=[str(bad), "do not match", "rerun"])


@case
def case_teacher_wrong_format_version(env: Env) -> Run:
    bad = _model_variant(env, "t.safetensors", format_version=99)
    return _probe(env, bad, expect=[str(bad), "format version 99", "rerun"])


@case
def case_teacher_missing(env: Env) -> Run:
    return _probe(env, env.tmp / "nowhere.safetensors", expect=["nowhere.safetensors", "not found", "ferd fetch-teacher"])


@case
def case_teacher_input_shape_differs_from_data(env: Env) -> Run:
    return _probe(env, env.path(TEACHER), params=_synthetic(image_size=12), expect=["[1, 16, 16]", "[1, 12, 12]", "check"])


@case
def case_teacher_class_count_differs_from_data(env: Env) -> Run:
    return _probe(env, env.path(TEACHER), params=_synthetic(num_classes=5), expect=["4 classes", "5 of", "check"])


@case
def case_student_missing(env: Env) -> Run:
    metrics = env.out / "metrics"
    return Run(["evaluate", "--name", "student", "--model", str(env.tmp / "student.safetensors"), "--metrics-dir",
                str(metrics)], [metrics / "student.json", metrics / "student_per_class.csv"],
               expect=["student.safetensors", "not found", "ferd distill"])


# --------------------------------------------------------------------------------------------
# image sets (gen-utae --pool, reweight --probe, distill --pool)


@case
def case_pool_truncated(env: Env) -> Run:
    bad = _truncated(env.path(POOL), env.tmp / "pool.h5", 0.5)
    return _gen_utae(env, bad, expect=[str(bad), "truncated or corrupt", "rerun"])


@case
def case_pool_truncated_superblock(env: Env) -> Run:
    bad = _truncated(env.path(POOL), env.tmp / "pool.h5", 0.01)
    return _gen_utae(env, bad, expect=[str(bad), "truncated or corrupt", "rerun"])


@case
def case_pool_random_bytes(env: Env) -> Run:
    bad = _random_bytes(env.tmp / "pool.h5", 1 << 16, seed=1)
    return _gen_utae(env, bad, expect=[str(bad), "truncated or corrupt", "rerun"])


@case
def case_pool_corrupt_inside(env: Env) -> Run:
    data = bytearray(env.path(POOL).read_bytes())
    n = len(data)
    data[n // 4: n - 16] = np.random.default_rng(2).integers(0, 256, n - 16 - n // 4, dtype=np.uint8).tobytes()
    bad = env.tmp / "pool.h5"
    bad.write_bytes(bytes(data))
    return _gen_utae(env, bad, expect=[str(bad), "rerun"])


@case
def case_pool_is_a_probe(env: Env) -> Run:
    return _gen_utae(env, env.path(PROBE), expect=["'probe' artifact where a 'pool' was expected", "check the path"])


@case
def case_pool_is_a_model(env: Env) -> Run:
    return _gen_utae(env, env.path(TEACHER), expect=[TEACHER, "a safetensors file where a ferd pool (HDF5)", "check the path"])


@case
def case_pool_wrong_image_shape(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        arrays["x"] = np.ascontiguousarray(arrays["x"][:, :, :12, :12])
        attrs["image_shape"] = [1, 12, 12]

    bad = _pool_variant(env, "pool.h5", change)
    return _gen_utae(env, bad, expect=[str(bad), "[1, 12, 12]", "does not match the teacher", "ferd synth-fae"])


@case
def case_pool_wrong_class_count(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        attrs["num_classes"] = 3
        attrs["class_names"] = attrs["class_names"][:3]

    bad = _pool_variant(env, "pool.h5", change)
    return _gen_utae(env, bad, expect=[str(bad), "3 classes", "does not match the teacher", "ferd synth-fae"])


@case
def case_pool_wrong_dtype(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        arrays["x"] = (arrays["x"] * 255).round().astype(np.uint8)

    bad = _pool_variant(env, "pool.h5", change)
    return _gen_utae(env, bad, expect=[str(bad), "uint8", "float32", "ferd synth-fae"])


@case
def case_pool_float64(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        arrays["x"] = arrays["x"].astype(np.float64)

    bad = _pool_variant(env, "pool.h5", change)
    return _distill(env, bad, expect=[str(bad), "float64", "float32", "ferd synth-fae"])


@case
def case_pool_values_outside_unit_interval(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        arrays["x"] = arrays["x"] * 2.0 - 0.5

    bad = _pool_variant(env, "pool.h5", change)
    return _gen_utae(env, bad, expect=[str(bad), "[0, 1]", "ferd synth-fae"])


@case
def case_pool_nan_values(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        arrays["x"][3, 0, 5, 5] = np.nan

    bad = _pool_variant(env, "pool.h5", change)
    return _distill(env, bad, expect=[str(bad), "[0, 1]", "ferd synth-fae"])


@case
def case_pool_labels_out_of_range(env: Env) -> Run:
    def change(arrays: dict, attrs: dict) -> None:
        arrays["y"][0] = 7

    bad = _pool_variant(env, "pool.h5", change)
    return _distill(env, bad, expect=[str(bad), "labels", "ferd synth-fae"])


@case
def case_pool_missing_dataset(env: Env) -> Run:
    bad = _pool_variant(env, "pool.h5", lambda arrays, attrs: arrays.pop("p_history"))
    return _distill(env, bad, expect=[str(bad), "lacks dataset(s) p_history", "rerun"])


@case
def case_pool_missing(env: Env) -> Run:
    return _distill(env, env.tmp / "no-pool.h5", expect=["no-pool.h5", "not found", "ferd synth-fae"])


@case
def case_probe_is_a_pool(env: Env) -> Run:
    out = env.out / "class_weights.json"
    return Run(["reweight", "--probe", str(env.path(POOL)), "--out", str(out)], [out],
               expect=["'pool' artifact where a 'probe' was expected", "check the path"])


@case
def case_probe_truncated(env: Env) -> Run:
    bad = _truncated(env.path(PROBE), env.tmp / "probe.h5", 0.5)
    out = env.out / "class_weights.json"
    return Run(["reweight", "--probe", str(bad), "--out", str(out)], [out], expect=[str(bad), "rerun"], keep=True)


@case
def case_probe_missing(env: Env) -> Run:
    out = env.out / "class_weights.json"
    return Run(["reweight", "--probe", str(env.tmp / "probe.h5"), "--out", str(out)], [out],
               expect=["probe.h5", "not found", "ferd probe"])


@case
def case_probe_missing_for_synthesis(env: Env) -> Run:
    out, log = env.out / "pool.h5", env.out / "synthesis.csv"
    return Run(["synth-fae", "--teacher", str(env.path(TEACHER)), "--weights", str(env.path(WEIGHTS)), "--probe",
                str(env.tmp / "probe.h5"), "--out", str(out), "--log", str(log)], [out, log],
               expect=["probe.h5", "not found", "ferd probe"])


@case
def case_class_weights_not_json(env: Env) -> Run:
    bad = env.tmp / "class_weights.json"
    bad.write_text('{"p": [0.25, 0.25,')
    out, log = env.out / "pool.h5", env.out / "synthesis.csv"
    return Run(["synth-fae", "--teacher", str(env.path(TEACHER)), "--weights", str(bad), "--probe", str(env.path(PROBE)),
                "--out", str(out), "--log", str(log)], [out, log], expect=[str(bad), "not valid JSON", "rerun"], keep=True)


@case
def case_class_weights_wrong_class_count(env: Env) -> Run:
    bad = env.tmp / "class_weights.json"
    bad.write_text(json.dumps({"p": [0.5, 0.5]}))
    out, log = env.out / "pool.h5", env.out / "synthesis.csv"
    return Run(["synth-fae", "--teacher", str(env.path(TEACHER)), "--weights", str(bad), "--probe", str(env.path(PROBE)),
                "--out", str(out), "--log", str(log)], [out, log], expect=[str(bad), "2 class proportions", "ferd reweight"])


# --------------------------------------------------------------------------------------------
# params


@case
def case_params_unknown_key(env: Env) -> Run:
    return _config(env, _section("probe", colour="red"), ["unknown key 'probe.colour'", "valid keys"])


@case
def case_params_misspelt_key(env: Env) -> Run:
    return _config(env, _section("utae", gama=0.3), ["unknown key 'utae.gama'", "did you mean 'utae.gamma'"])


@case
def case_params_misspelt_section(env: Env) -> Run:
    params = tiny_params()
    params["distil"] = params.pop("distill")
    return _config(env, params, ["unknown key 'distil'", "did you mean 'distill'"])


@case
def case_params_wrong_type(env: Env) -> Run:
    return _config(env, _section("probe", steps="ten"), ["probe.steps", "expected an integer", "'ten'"])


@case
def case_params_bool_for_int(env: Env) -> Run:
    return _config(env, _section("fae", epochs=True), ["fae.epochs", "expected an integer"])


@case
def case_params_section_not_a_mapping(env: Env) -> Run:
    return _config(env, tiny_params(fae=[1, 2]), ["fae", "expected a mapping"])


@case
def case_params_negative_eps(env: Env) -> Run:
    return _config(env, _section("data", eps=-0.1), ["data.eps", "must be > 0", "-0.1"])


@case
def case_params_gamma_above_one(env: Env) -> Run:
    return _config(env, _section("utae", gamma=1.5), ["utae.gamma", "must be <= 1", "1.5"])


@case
def case_params_gamma_negative(env: Env) -> Run:
    return _config(env, _section("utae", gamma=-0.2), ["utae.gamma", "must be >= 0", "-0.2"])


@case
def case_params_too_few_classes(env: Env) -> Run:
    return _config(env, _synthetic(num_classes=1), ["data.synthetic.num_classes", "must be >= 2"])


@case
def case_params_negative_eps_sweep(env: Env) -> Run:
    return _config(env, _section("evaluate", eps_sweep=[1.0, -0.5]), ["evaluate.eps_sweep", "-0.5", "> 0"])


@case
def case_params_closed_set_typo(env: Env) -> Run:
    return _config(env, _section("reweight", method="softmx"), ["reweight.method", "did you mean 'softmax'"])


@case
def case_params_unknown_teacher_arch(env: Env) -> Run:
    return _fetch(env, teacher={"arch": "resnet99"}, expect=["teacher.arch", "'resnet99'", "did you mean"])


@case
def case_params_unknown_student_arch(env: Env) -> Run:
    return _distill(env, params=_section("distill", arch="vgg16"), expect=["distill.arch", "'vgg16'", "is not one of"])


@case
def case_params_not_yaml(env: Env) -> Run:
    return _config(env, "seed: 0\ndata: {name: synthetic\n  eps: [0.1\n", ["not valid YAML", "at line", "fix the syntax"])


@case
def case_params_file_missing(env: Env) -> Run:
    return _config(env, None, ["params.yaml", "params file not found", "--params"])


@case
def case_params_url_without_sha256(env: Env) -> Run:
    return _fetch(env, teacher={"source": "url:http://127.0.0.1:1/t.pt"}, expect=["teacher.sha256", "needs the file's sha256"])


@case
def case_params_device_typo(env: Env) -> Run:
    return _config(env, tiny_params(runtime={"device": "gpu", "threads": 1}), ["runtime.device", "'gpu'", "cuda"])


# --------------------------------------------------------------------------------------------
# teacher sources (fetch-teacher)


def _checkpoint(env: Env) -> tuple[Path, str]:
    import hashlib

    from ferd.models import build_model

    torch.manual_seed(0)
    ckpt = env.tmp / "remote.pt"
    torch.save(build_model("cnn", num_classes=4, in_channels=1, image_size=16, width=4).state_dict(), ckpt)
    return ckpt, hashlib.sha256(ckpt.read_bytes()).hexdigest()


@case
def case_url_wrong_sha256(env: Env) -> Run:
    ckpt, digest = _checkpoint(env)
    wrong = "0" * 64
    return _fetch(env, teacher={"source": f"url:{ckpt.as_uri()}", "sha256": wrong},
                  expect=[f"sha256 is {digest}", f"expected {wrong}", "nothing was written"], keep=True)


@case
def case_url_unreachable(env: Env) -> Run:
    url = f"http://127.0.0.1:{_closed_port()}/x.pt"
    return _fetch(env, teacher={"source": f"url:{url}", "sha256": "0" * 64, "download_timeout": 2},
                  expect=[f"cannot download {url}", "check the URL"], max_seconds=5)


@case
def case_url_server_never_answers(env: Env) -> Run:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts connections into the backlog, never answers
    _LISTENERS.append(listener)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.pt"
    return _fetch(env, teacher={"source": f"url:{url}", "sha256": "0" * 64, "download_timeout": 1},
                  expect=[f"cannot download {url}", "timed out"], max_seconds=6)


@case
def case_file_source_missing(env: Env) -> Run:
    return _fetch(env, teacher={"source": f"file:{env.tmp / 'none.pt'}"}, expect=["none.pt", "not found", "teacher.source"])


@case
def case_file_source_wrong_sha256(env: Env) -> Run:
    ckpt, digest = _checkpoint(env)
    return _fetch(env, teacher={"source": f"file:{ckpt}", "sha256": "1" * 64}, expect=[f"sha256 is {digest}", "teacher.sha256"])


@case
def case_file_source_random_bytes(env: Env) -> Run:
    bad = _random_bytes(env.tmp / "ckpt.pt", 1 << 12, seed=3)
    return _fetch(env, teacher={"source": f"file:{bad}"}, expect=[str(bad), "not a readable torch checkpoint"],
                  forbid=["weights_only` set to `False"])




@case
def case_file_source_pickled_object(env: Env) -> Run:
    ckpt = env.tmp / "evil.pt"
    torch.save({"model": argparse.Namespace(a=1)}, ckpt)  # an arbitrary object: loading it would run pickle code
    return _fetch(env, teacher={"source": f"file:{ckpt}"}, expect=[str(ckpt), "never unpickles", "state_dict (torch.save"],
                  forbid=["weights_only` set to `False"])


@case
def case_file_source_other_arch(env: Env) -> Run:
    ckpt, _ = _checkpoint(env)  # a cnn state dict
    return _fetch(env, teacher={"source": f"file:{ckpt}", "arch": "resnet8"}, expect=["teacher.arch"])


# --------------------------------------------------------------------------------------------
# datasets


@case
def case_fashion_mnist_root_missing(env: Env) -> Run:
    import ferd.data

    root = env.tmp / "no-such-dir"
    return _fetch(env, data={"name": "fashion-mnist", "root": str(root)},
                  expect=["Fashion-MNIST not found", str(root), "data.download: true"],
                  patches=[(ferd.data, "SYSTEM_FASHION_MNIST_DIRS", ())])


@case
def case_cifar10_root_missing(env: Env) -> Run:
    root = env.tmp / "no-such-dir"
    return _fetch(env, data={"name": "cifar10", "root": str(root)}, expect=["CIFAR-10 not found", str(root), "data.download"])


def _cifar_with_damaged_batch(env: Env, data: bytes) -> Path:
    from tests.fixtures import write_cifar10_batches

    folder = write_cifar10_batches(env.tmp / "raw", n_per_batch=2)
    (folder / "data_batch_1").write_bytes(data)
    return folder


@case
def case_cifar10_batch_not_a_pickle(env: Env) -> Run:
    folder = _cifar_with_damaged_batch(env, b"not a pickle at all")
    return _fetch(env, data={"name": "cifar10", "root": str(env.tmp / "raw"), "verify_checksums": False},
                  expect=["CIFAR-10 in", str(folder), "could not be read", "UnpicklingError", "data.download: true"])


@case
def case_cifar10_batch_truncated(env: Env) -> Run:
    from tests.fixtures import write_cifar10_batches

    good = write_cifar10_batches(env.tmp / "good", n_per_batch=2) / "data_batch_2"
    folder = _cifar_with_damaged_batch(env, good.read_bytes()[:300])
    return _fetch(env, data={"name": "cifar10", "root": str(env.tmp / "raw"), "verify_checksums": False},
                  expect=[str(folder), "could not be read", "data.download: true"])


# --------------------------------------------------------------------------------------------
# numerical blow-ups


@case
def case_distill_loss_not_finite(env: Env) -> Run:
    return _distill(env, params=_section("distill", lr=1e30), expect=["non-finite", "at epoch", "loss"])


@case
def case_teacher_training_diverges(env: Env) -> Run:
    base = tiny_params()
    train = {**base["teacher"]["train"], "lr": 1e30}
    return _fetch(env, teacher={"train": train}, expect=["diverged", "epoch", "teacher.train.lr"])


# --------------------------------------------------------------------------------------------
# the contract


@pytest.fixture(autouse=True, scope="module")
def _close_listeners():
    yield
    for s in _LISTENERS:
        s.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name]))
                                  if name in XFAIL else name for name in sorted(CASES)])
def test_bad_input_is_one_line_error(name, upstream, tmp_path, monkeypatch):
    env = Env(tmp_path, upstream)
    run = CASES[name](env)
    for obj, attr, value in run.patches:
        monkeypatch.setattr(obj, attr, value)
    monkeypatch.chdir(tmp_path)
    params_path = tmp_path / "params.yaml"
    if isinstance(run.params, dict):
        write_params(params_path, run.params)
    elif isinstance(run.params, str):
        params_path.write_text(run.params)
    if run.keep:
        for out in run.outputs:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(SENTINEL)
    folders = {out.parent for out in run.outputs}
    before = {f: _snapshot(f) if f.is_dir() else {} for f in folders}

    start = time.perf_counter()
    result = runner.invoke(app, ["--params", str(params_path), *run.args])
    elapsed = time.perf_counter() - start

    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    message = errors[0]
    for text in run.expect:
        assert text.lower() in message.lower(), f"{text!r} not in {message!r}"
    for text in run.forbid:
        assert text.lower() not in message.lower(), f"{text!r} in {message!r}"
    assert len(message) < 600, message
    for out in run.outputs:
        if run.keep:
            assert out.read_bytes() == SENTINEL, f"{out} was overwritten"
        else:
            assert not out.exists(), f"{out} was written"
    for folder in folders:
        after = _snapshot(folder) if folder.is_dir() else {}
        assert after == before[folder], f"{folder}: files appeared or changed: {sorted(set(after) ^ set(before[folder]))}"
    if run.max_seconds is not None:
        assert elapsed < run.max_seconds, f"took {elapsed:.1f} s"


def test_matrix_is_large_enough():
    assert len(CASES) >= 20
