"""Ready-made settings in ``configs/``: YAML overlays that replace sections' keys of params.yaml.

A preset holds only what differs from the base (the paper's dataset, networks and budgets), so it
stays readable and a new params key keeps its default. ``ferd preset NAME`` writes the merged,
validated result to params.yaml, which is what DVC tracks. ``configs/compare.yaml`` is not a
preset but the comparison's budget (``ferd compare``); it uses the same format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferd.errors import ConfigError

__all__ = ["CONFIGS", "list_presets", "merge", "merged_params", "read_overlay", "render"]

CONFIGS = Path("configs")
_NOT_PRESETS = {"compare"}


def list_presets(configs: Path = CONFIGS) -> list[str]:
    """Names of the presets in ``configs`` (every ``*.yaml`` but the comparison setting)."""
    return sorted(p.stem for p in Path(configs).glob("*.yaml") if p.stem not in _NOT_PRESETS)


def read_overlay(path: Path) -> dict[str, Any]:
    """A YAML mapping of params sections (nested); a one-line error for a missing or malformed file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections")
    return data


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``, recursively for mappings; lists and scalars are replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def merged_params(name: str, base: Path = Path("params.yaml"), configs: Path = CONFIGS) -> dict[str, Any]:
    """The preset ``name`` over ``base``, validated (raises ConfigError naming the bad key)."""
    from ferd.config import params_from_mapping

    path = Path(configs) / f"{name}.yaml"
    if name in _NOT_PRESETS or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets(configs)) or '(none)'}")
    merged = merge(read_overlay(base), read_overlay(path))
    try:
        params_from_mapping(merged)
    except ConfigError as e:
        raise ConfigError(f"preset {name}: {e}") from None
    return merged


def render(merged: dict[str, Any], name: str) -> str:
    """params.yaml text for a merged preset, with a header that says where it came from."""
    import yaml

    header = (f"# Written by `ferd preset {name}`: configs/{name}.yaml over the previous params.yaml.\n"
              "# The commented default is in git: `git checkout params.yaml` restores it.\n")
    return header + yaml.safe_dump(merged, sort_keys=False, default_flow_style=None, width=110)
