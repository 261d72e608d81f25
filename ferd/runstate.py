"""Run state: what a long stage saves every few epochs so that a rerun after a kill continues.

``fetch-teacher`` (training), ``synth-fae`` and ``distill`` save their full state (models, optimiser
and scheduler state, RNG states, the pool so far, logs) to ``<runtime.state_dir>/<stage>/<key>/``
after every ``runtime.checkpoint_every`` epochs, and delete it once their artifacts are written.
``key`` is a hash of everything the result depends on (the stage's params and the bytes of its
input artifacts), so a rerun with other params or other inputs never picks up a stale state; it
simply starts over (and the stale folder can be deleted, see README "When things go wrong").

The run-state folder lives outside DVC's outputs (it is git-ignored and declared nowhere), so DVC
never caches a half-finished run. The file is safetensors: tensors by name plus one JSON skeleton
in the metadata that rebuilds the nested dicts / lists / numbers around them, and a sha256 digest
of both (``ferd.artifacts.tensors_digest``, checked on load: a damaged state is an error, never a
silently different resume; format 2, issue 12). Nothing is pickled. Writes are atomic (temp file +
rename): a kill while saving leaves the previous state.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from ferd.errors import ArtifactError

__all__ = ["RunState", "pack", "unpack"]

_META_KEY = "ferd_run_state"
_DIGEST_KEY = "ferd_run_state_digest"
_FORMAT = 2  # part of the key: a state of another format is never found, the stage starts over


def pack(obj: Any, tensors: dict[str, Tensor] | None = None) -> tuple[Any, dict[str, Tensor]]:
    """``(skeleton, tensors)``: a JSON-able skeleton of ``obj`` whose tensors are moved into ``tensors``.

    Supports dicts (str or int keys), lists, tuples, str, int, float (NaN/inf included), bool, None and
    tensors; anything else is a bug in the caller and raises TypeError.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor": name}, tensors
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(f"run state: dict keys must be str or int, got {type(k).__name__}")
            items.append([k, pack(v, tensors)[0]])
        return {"__dict": items}, tensors
    if isinstance(obj, list | tuple):
        return {"__list" if isinstance(obj, list) else "__tuple": [pack(v, tensors)[0] for v in obj]}, tensors
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj, tensors
    raise TypeError(f"run state: cannot store a {type(obj).__name__}")


def unpack(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(skeleton, dict):
        if "__tensor" in skeleton:
            return tensors[skeleton["__tensor"]]
        if "__dict" in skeleton:
            return {k: unpack(v, tensors) for k, v in skeleton["__dict"]}
        if "__list" in skeleton:
            return [unpack(v, tensors) for v in skeleton["__list"]]
        if "__tuple" in skeleton:
            return tuple(unpack(v, tensors) for v in skeleton["__tuple"])
        raise ValueError(f"run state: unknown node {sorted(skeleton)}")
    return skeleton


class RunState:
    """The run-state file of one stage run, keyed by what the run depends on."""

    def __init__(self, root: str | Path, stage: str, fingerprint: dict[str, Any]) -> None:
        text = json.dumps({"stage": stage, "format": _FORMAT, **fingerprint}, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root) / stage / self.key
        self.path = self.dir / "state.safetensors"

    def save(self, state: Any) -> None:
        """Write ``state`` atomically (replacing the previous one)."""
        from safetensors.torch import save_file

        from ferd.artifacts import atomic_path, tensors_digest

        skeleton, tensors = pack(state)
        text = json.dumps(skeleton)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: text, _DIGEST_KEY: tensors_digest(text, tensors)})

    def load(self) -> Any | None:
        """The saved state, or None when there is none; a clear error for an unreadable or damaged file."""
        from safetensors import SafetensorError, safe_open

        from ferd.artifacts import tensors_digest

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            text = meta[_META_KEY]
            intact = tensors_digest(text, tensors) == meta[_DIGEST_KEY]
            skeleton = json.loads(text) if intact else None
        except (SafetensorError, OSError, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ArtifactError(f"{self.path}: unreadable run state ({type(e).__name__}); delete {self.dir} to start "
                                "this stage over") from None
        if not intact:
            raise ArtifactError(f"{self.path}: damaged run state (checksum mismatch); delete {self.dir} to start this "
                                "stage over")
        return unpack(skeleton, tensors)

    def clear(self) -> None:
        """Delete this run's state (after the stage wrote its artifacts) and empty parent folders."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for parent in (self.dir.parent, self.dir.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
