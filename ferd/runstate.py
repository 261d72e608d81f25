"""Run state: what a long stage saves every few epochs so that a rerun after a kill continues.

``fetch-teacher`` (training), ``synth-fae`` and ``distill`` save their full state (models, optimiser
and scheduler state, RNG states, the pool so far, logs) to ``<runtime.state_dir>/<stage>/<key>/``
after every ``runtime.checkpoint_every`` epochs, and delete it once their artifacts are written.
``key`` is a hash of everything the result depends on (the stage's params and the bytes of its
input artifacts), so a rerun with other params or other inputs never picks up a stale state; it
simply starts over (and the stale folder can be deleted, see README "When things go wrong").

The run-state folder lives outside DVC's outputs (it is git-ignored and declared nowhere), so DVC
never caches a half-finished run. The file is safetensors: tensors by name plus one JSON skeleton
in the metadata that rebuilds the nested dicts / lists / numbers around them. A sha256 digest of
both (``ferd.artifacts.tensors_digest``) is checked on load: a damaged state or part is an error,
never a silently different resume (issue 12). Nothing is pickled.
Writes are atomic (temp file + rename): a kill while saving leaves the previous state.

Append-only data (the pool, which grows by one batch per epoch) goes into :class:`Part` files
beside the state file: a part is written once, under a name that fixes its content (e.g. the pool
rows 128-256, :func:`row_parts`), and later saves only reference it, so a checkpoint costs the new
rows, not the whole pool (hundreds of MB at CIFAR scale) every epoch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ferd.errors import ArtifactError

__all__ = ["Part", "RunState", "join_parts", "pack", "row_parts", "unpack"]

_META_KEY = "ferd_run_state"
_DIGEST_KEY = "ferd_run_state_digest"
_FORMAT = 2  # 2: append-only parts in their own files, digests; part of the key (an old state is never found)
_PART_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Part:
    """Tensors stored once in their own file (``part-<name>.safetensors``) and referenced by name.

    The name must determine the content: :meth:`RunState.save` writes a part only the first time it
    sees the name (or when a file of that name was not written or loaded by this run), so the same
    name with other tensors would keep the old ones. ``tensors`` is called only when the part is
    written. A loaded state holds the part's tensors as a plain ``dict``.
    """

    name: str
    tensors: Callable[[], dict[str, Tensor]]

    def __post_init__(self) -> None:
        if not _PART_NAME.fullmatch(self.name):
            raise ValueError(f"run state: part name {self.name!r} must be letters, digits, '_', '.' or '-'")


def row_parts(prefix: str, columns: dict[str, Tensor], runs: Tensor) -> list[Part]:
    """Append-only rows as parts: the rows of ``columns`` (tensors of equal length) cut wherever the
    integer tensor ``runs`` (e.g. each image's synthesis epoch) changes value; one part per run,
    named ``<prefix>-<start>-<stop>`` after its rows, so a grown table reuses its earlier parts.
    ``join_parts`` of the loaded parts gives the rows back in order."""
    values = runs.detach().cpu().tolist()
    bounds, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            bounds.append((start, i))
            start = i
    return [Part(f"{prefix}-{a}-{b}", lambda a=a, b=b: {k: v[a:b] for k, v in columns.items()}) for a, b in bounds]


def join_parts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The rows of loaded parts, concatenated in order, column by column (one ``cat``, at load time)."""
    import torch

    if not parts:
        raise ValueError("join_parts: no parts to join")
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def pack(
    obj: Any, tensors: dict[str, Tensor] | None = None, parts: dict[str, Part] | None = None
) -> tuple[Any, dict[str, Tensor]]:
    """``(skeleton, tensors)``: a JSON-able skeleton of ``obj`` whose tensors are moved into ``tensors``.

    Supports dicts (str or int keys), lists, tuples, str, int, float (NaN/inf included), bool, None,
    tensors and :class:`Part` (collected into ``parts``, by name; required for a state holding parts);
    anything else is a bug in the caller and raises TypeError.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Part):
        if parts is None:
            raise TypeError("run state: pack() needs a parts dict for a state holding parts")
        parts[obj.name] = obj
        return {"__part": obj.name}, tensors
    if isinstance(obj, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor": name}, tensors
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(f"run state: dict keys must be str or int, got {type(k).__name__}")
            items.append([k, pack(v, tensors, parts)[0]])
        return {"__dict": items}, tensors
    if isinstance(obj, list | tuple):
        return {"__list" if isinstance(obj, list) else "__tuple": [pack(v, tensors, parts)[0] for v in obj]}, tensors
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj, tensors
    raise TypeError(f"run state: cannot store a {type(obj).__name__}")


def unpack(skeleton: Any, tensors: dict[str, Tensor], parts: dict[str, dict[str, Tensor]] | None = None) -> Any:
    """The inverse of :func:`pack`; a part becomes its loaded tensors (``parts[name]``, a dict)."""
    if isinstance(skeleton, dict):
        if "__tensor" in skeleton:
            return tensors[skeleton["__tensor"]]
        if "__part" in skeleton:
            if parts is None or skeleton["__part"] not in parts:
                raise ValueError(f"run state: part {skeleton['__part']!r} is missing")
            return parts[skeleton["__part"]]
        if "__dict" in skeleton:
            return {k: unpack(v, tensors, parts) for k, v in skeleton["__dict"]}
        if "__list" in skeleton:
            return [unpack(v, tensors, parts) for v in skeleton["__list"]]
        if "__tuple" in skeleton:
            return tuple(unpack(v, tensors, parts) for v in skeleton["__tuple"])
        raise ValueError(f"run state: unknown node {sorted(skeleton)}")
    return skeleton


def _part_names(skeleton: Any) -> list[str]:
    """The part names a skeleton references, in order of appearance."""
    if not isinstance(skeleton, dict):
        return []
    if "__part" in skeleton:
        return [skeleton["__part"]]
    if "__dict" in skeleton:
        children = [v for _k, v in skeleton["__dict"]]
    else:
        children = skeleton.get("__list", skeleton.get("__tuple", []))  # a "__tensor" node has none
    return [name for child in children for name in _part_names(child)]


class RunState:
    """The run-state file of one stage run, keyed by what the run depends on."""

    def __init__(self, root: str | Path, stage: str, fingerprint: dict[str, Any]) -> None:
        text = json.dumps({"stage": stage, "format": _FORMAT, **fingerprint}, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root) / stage / self.key
        self.path = self.dir / "state.safetensors"
        self._parts_on_disk: set[str] = set()  # parts this run wrote or loaded: never written again

    def part_path(self, name: str) -> Path:
        return self.dir / f"part-{name}.safetensors"

    def save(self, state: Any) -> None:
        """Write ``state`` atomically (replacing the previous one); new parts first, each in its own file."""
        from safetensors.torch import save_file

        from ferd.artifacts import atomic_path, tensors_digest

        parts: dict[str, Part] = {}
        skeleton, tensors = pack(state, None, parts)
        text = json.dumps(skeleton)
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, part in parts.items():
            if name in self._parts_on_disk:
                continue
            columns = {k: v.detach().to("cpu").contiguous() for k, v in part.tensors().items()}
            with atomic_path(self.part_path(name)) as tmp:
                save_file(columns, str(tmp), metadata={_DIGEST_KEY: tensors_digest("", columns)})
            self._parts_on_disk.add(name)
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: text, _DIGEST_KEY: tensors_digest(text, tensors)})

    def load(self) -> Any | None:
        """The saved state, or None when there is none; a clear error for an unreadable or damaged file or part."""
        from safetensors import SafetensorError, safe_open

        from ferd.artifacts import tensors_digest

        if not self.path.is_file():
            return None
        where = self.path
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            text = meta[_META_KEY]
            intact = tensors_digest(text, tensors) == meta[_DIGEST_KEY]
            skeleton = json.loads(text) if intact else None
            parts = {}
            for name in _part_names(skeleton) if intact else ():
                where = self.part_path(name)
                with safe_open(str(where), framework="pt") as f:
                    part_meta = f.metadata() or {}
                    parts[name] = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
                if tensors_digest("", parts[name]) != part_meta[_DIGEST_KEY]:
                    intact = False
                    break
        except (SafetensorError, OSError, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ArtifactError(f"{where}: unreadable run state ({type(e).__name__}); delete {self.dir} to start "
                                "this stage over") from None
        if not intact:
            raise ArtifactError(f"{where}: damaged run state (checksum mismatch); delete {self.dir} to start this "
                                "stage over")
        self._parts_on_disk |= set(parts)
        return unpack(skeleton, tensors, parts)

    def clear(self) -> None:
        """Delete this run's state (after the stage wrote its artifacts) and empty parent folders."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for parent in (self.dir.parent, self.dir.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
