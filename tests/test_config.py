from __future__ import annotations

import dataclasses

import pytest

from ferd.config import ARCHITECTURES, Params, load_params, params_from_mapping, parse_set_options
from ferd.errors import ConfigError
from tests.conftest import REPO, tiny_params, write_params


def test_repository_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.data.name == "fashion-mnist"
    assert params.data.eps == pytest.approx(0.1)
    assert params.teacher.source == "train"


def test_defaults_are_frozen():
    params = params_from_mapping({})
    assert isinstance(params, Params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"teacher": {"widht": 8}}, "did you mean 'teacher.width'"),
        ({"teacher": {"train": {"epoch": 1}}}, "did you mean 'teacher.train.epochs'"),
        ({"evalute": {}}, "did you mean 'evaluate'"),
        ({"data": {"eps": -0.1}}, "data.eps: must be > 0.0"),
        ({"data": {"eps": "big"}}, "data.eps: expected a number"),
        ({"teacher": {"width": 2.5}}, "teacher.width: expected an integer"),
        ({"teacher": {"width": True}}, "teacher.width: expected an integer"),
        ({"data": {"download": "yes"}}, "data.download: expected true or false"),
        ({"data": {"name": "cifar"}}, "did you mean 'cifar10'"),
        ({"teacher": {"arch": "resnet-18"}}, "did you mean 'resnet18'"),
        ({"teacher": {"source": "http://x"}}, "teacher.source"),
        ({"teacher": {"source": "url:http://x/m.pt"}}, "needs the file's sha256"),
        ({"teacher": {"mean": [0.5]}}, "give both or neither"),
        ({"teacher": {"mean": [0.5], "std": [0.0]}}, "teacher.std"),
        ({"runtime": {"device": "gpu"}}, "runtime.device"),
        ({"runtime": {"threads": -1}}, "runtime.threads: must be >= 0"),
        ({"evaluate": {"autoattack": "quick"}}, "evaluate.autoattack"),
        ({"evaluate": {"eps_sweep": 1.0}}, "evaluate.eps_sweep: expected a list"),
        ({"data": 3}, "data: expected a mapping"),
    ],
)
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        params_from_mapping(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_int_accepted_for_float_and_tuple_coercion():
    params = params_from_mapping({"data": {"eps": 1}, "teacher": {"mean": [0, 1], "std": [1, 2]}})
    assert params.data.eps == 1.0 and isinstance(params.data.eps, float)
    assert params.teacher.mean == (0.0, 1.0)


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_overrides_apply_dotted_keys(tmp_path):
    path = write_params(tmp_path / "params.yaml", tiny_params())
    params = load_params(path, {"runtime.device": "cpu", "teacher.train.epochs": 5})
    assert params.teacher.train.epochs == 5


def test_architecture_list_matches_registry():
    from ferd.models import list_architectures

    assert set(list_architectures()) == set(ARCHITECTURES)


def test_a_removed_key_says_why_it_is_gone():
    raw = {"distill": {"holdout_per_class": 4}}
    with pytest.raises(ConfigError, match=r"'distill.holdout_per_class' was removed: the distillation holdout is now"):
        params_from_mapping(raw)


def test_set_options_read_values_as_dvc_does():
    sets = parse_set_options(["distill.steps=160", "evaluate.autoattack=off", "fae.conditional=true", "x.y=0.5"])
    assert sets == {"distill.steps": 160, "evaluate.autoattack": "off", "fae.conditional": True, "x.y": 0.5}
    with pytest.raises(ConfigError, match=r"^--seeds-set: expected KEY=VALUE .*'distill.steps'$"):
        parse_set_options(["distill.steps"], flag="--seeds-set")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_options(["=3"])
