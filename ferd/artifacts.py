"""Artifacts exchanged between stages: safetensors models, HDF5 image sets, JSON and CSV results.

Rules (DESIGN.md "Artifacts"):
- every write is atomic: a temporary file in the destination folder, then ``os.replace``; a crash
  leaves the previous complete artifact or none, never a half-written one;
- every write is byte-stable: the same inputs give the same bytes (sorted JSON, no HDF5 timestamps,
  fixed chunking and compression), so DVC's run cache and ``dvc status`` stay truthful;
- every read is validated and fails with an ``ArtifactError`` that says what is wrong and what to do;
- nothing is ever unpickled.

Models are safetensors files holding a float32 state dict and one metadata key, ``ferd``, whose
value is sorted JSON with at least: kind="model", format_version, arch, num_classes, input_shape,
mean, std, dataset, source.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ferd.errors import ArtifactError, ConfigError

FORMAT_VERSION = 1
MODEL_META_KEYS = ("kind", "format_version", "arch", "num_classes", "input_shape", "mean", "std", "dataset", "source")


# --------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it.

    The temporary file is named ``.<name>.<pid>.<random>.tmp``. A writer killed with SIGKILL cannot
    delete its own, so every write first removes the temporary files of ``path`` whose process is
    gone (never those of a live writer).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # make the content durable before it becomes visible
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temps(dest: Path) -> None:
    """Delete ``.<dest.name>.<pid>.*.tmp`` left by writers that no longer run."""
    prefix = f".{dest.name}."
    for tmp in dest.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_text = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, owned by someone else
            continue


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _require_file(path: str | Path, what: str, produced_by: str | None) -> Path:
    p = Path(path)
    if not p.is_file():
        hint = f"; run `ferd {produced_by}` (or `dvc repro`) first" if produced_by else ""
        raise ArtifactError(f"{p}: {what} not found{hint}")
    return p


# --------------------------------------------------------------------------------------------
# JSON / CSV


def dumps_json(obj: Any) -> str:
    """Sorted, indented JSON with a trailing newline; NaN/inf are refused (they are not JSON)."""
    return json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n"


def save_json(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, dumps_json(obj).encode())


def load_json(path: str | Path, *, what: str = "JSON file", produced_by: str | None = None) -> Any:
    p = _require_file(path, what, produced_by)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{p}: not valid JSON ({exc}); delete it and rerun the stage that writes it") from None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    return str(v)


def save_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """One row per mapping, columns in the given order, floats with 6 significant digits."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row[c]) for c in columns])
    write_bytes_atomic(path, buf.getvalue().encode())


def load_csv(path: str | Path, *, produced_by: str | None = None) -> list[dict[str, str]]:
    p = _require_file(path, "CSV file", produced_by)
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------
# models (safetensors)


def model_meta(
    *,
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    dataset: str,
    source: str,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata every model artifact carries (``extra`` adds e.g. width, class_names, metrics)."""
    meta = {
        "kind": "model",
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "dataset": dataset,
        "source": source,
    }
    meta.update(extra)
    return meta


def save_model(path: str | Path, state_dict: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Write a float32 state dict + sorted-JSON metadata atomically (byte-stable)."""
    import torch
    from safetensors.torch import save as st_save

    missing = [k for k in MODEL_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")  # a bug in the caller, not user input
    tensors = {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        tensors[name] = t.contiguous().clone()
    data = st_save(tensors, metadata={"ferd": json.dumps(dict(meta), sort_keys=True, allow_nan=False)})
    write_bytes_atomic(path, data)


def _read_safetensors_header(p: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves to give precise errors for truncated/corrupt files."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{p}: truncated safetensors file ({size} bytes); delete it and rerun the stage")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise ArtifactError(f"{p}: corrupt or truncated safetensors header; delete it and rerun the stage")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{p}: corrupt safetensors header (not JSON); delete it and rerun the stage") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ArtifactError(f"{p}: corrupt safetensors header; delete it and rerun the stage")
    try:
        end = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):  # an entry without valid data_offsets
        raise ArtifactError(f"{p}: corrupt safetensors header (bad tensor entry); delete it and rerun the stage") from None
    if end != size:
        raise ArtifactError(f"{p}: truncated safetensors file ({size} of {end} bytes); delete it and rerun the stage")
    return header


def read_model_meta(path: str | Path, *, produced_by: str | None = "fetch-teacher") -> dict[str, Any]:
    """Validated metadata of a model artifact (reads only the header)."""
    p = _require_file(path, "model file", produced_by)
    if p.suffix != ".safetensors" and _sniff(p) != "safetensors":
        raise ArtifactError(f"{p}: expected a ferd model (.safetensors), got {_sniff(p) or 'an unknown file'}")
    header = _read_safetensors_header(p)
    raw = (header.get("__metadata__") or {}).get("ferd")
    if raw is None:
        raise ArtifactError(
            f"{p}: safetensors file without ferd metadata; import it with `ferd fetch-teacher` (teacher.source: file:{p})"
        )
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        meta = None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{p}: corrupt ferd metadata; delete it and rerun the stage")
    if meta.get("kind") != "model":
        raise ArtifactError(f"{p}: a ferd {meta.get('kind')!r} artifact, not a model; check the path")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p}: model format version {meta.get('format_version')} is not {FORMAT_VERSION}; rerun the stage that wrote it"
        )
    missing = [k for k in MODEL_META_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{p}: model metadata lacks {', '.join(missing)}; rerun the stage that wrote it")
    return meta


def load_model_state(path: str | Path, *, produced_by: str | None = "fetch-teacher") -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, metadata) of a model artifact, validated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_model_meta(path, produced_by=produced_by)
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: unreadable safetensors data ({exc}); delete it and rerun the stage") from None
    return state, meta


def load_model(path: str | Path, *, device: Any = "cpu", produced_by: str | None = "fetch-teacher"):
    """Build the network a model artifact describes, load its weights, return (model in eval mode, meta)."""
    from ferd.models import ARCH_REGISTRY, build_model

    state, meta = load_model_state(path, produced_by=produced_by)
    if meta["arch"] not in ARCH_REGISTRY:
        raise ArtifactError(f"{path}: unknown architecture {meta['arch']!r} in the model metadata (valid: "
                            f"{', '.join(sorted(ARCH_REGISTRY))}); the file is corrupt, rerun the stage that wrote it")
    try:
        c, h, _w = meta["input_shape"]
        model = build_model(
            meta["arch"],
            num_classes=meta["num_classes"],
            in_channels=c,
            image_size=h,
            mean=meta["mean"],
            std=meta["std"],
            width=meta.get("width", 16),
        )
    except (ConfigError, TypeError, ValueError) as exc:  # metadata values of the wrong type, length or range
        raise ArtifactError(f"{path}: model metadata describes no buildable network ({exc}); rerun the stage that wrote it"
                            ) from None
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) + [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if bad:
        raise ArtifactError(
            f"{path}: weights do not match arch {meta['arch']!r} ({len(bad)} keys differ, e.g. {bad[0]}); "
            "the file is inconsistent, rerun the stage that wrote it"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    return model, meta


def require_compatible(meta: Mapping[str, Any], path: str | Path, *, num_classes: int, image_shape: Sequence[int],
                       what: str) -> None:
    """Raise unless the model described by ``meta`` takes ``image_shape`` images of ``num_classes`` classes."""
    if list(meta["input_shape"]) != list(image_shape) or int(meta["num_classes"]) != int(num_classes):
        raise ArtifactError(
            f"{path}: model takes {meta['num_classes']} classes of {list(meta['input_shape'])} images but {what} has "
            f"{num_classes} of {list(image_shape)}; check data.name or rerun the upstream stages"
        )


# --------------------------------------------------------------------------------------------
# image sets (HDF5)


def save_h5(
    path: str | Path,
    *,
    kind: str,
    arrays: Mapping[str, Any],
    attrs: Mapping[str, Any],
    chunk_rows: int = 256,
) -> None:
    """Write numpy arrays as HDF5 datasets plus provenance attributes, atomically and byte-stably.

    Arrays with a leading sample axis are chunked by ``chunk_rows`` and gzip-compressed. Attribute
    values that are not scalars/strings are stored as sorted JSON strings.
    """
    import h5py
    import numpy as np

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as fh:
            fh.attrs["kind"] = kind
            fh.attrs["format_version"] = FORMAT_VERSION
            for key in sorted(attrs):
                value = attrs[key]
                if isinstance(value, str | int | float | bool | np.integer | np.floating):
                    fh.attrs[key] = value
                else:
                    fh.attrs[key] = json.dumps(value, sort_keys=True, allow_nan=False)
            for name in sorted(arrays):
                arr = np.ascontiguousarray(arrays[name])
                kwargs: dict[str, Any] = {"track_times": False}
                if arr.ndim >= 1 and arr.shape[0] > 0:
                    kwargs.update(
                        chunks=(min(chunk_rows, arr.shape[0]), *arr.shape[1:]), compression="gzip",
                        compression_opts=4, shuffle=True,
                    )
                fh.create_dataset(name, data=arr, **kwargs)


#: What h5py raises for a damaged file, depending on which structure the damage hit (a fuzzed pool
#: gave all five: truncated superblock, bad object header, bad symbol table, a dataset turned group).
_H5_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def load_h5(
    path: str | Path,
    *,
    kind: str,
    required: Sequence[str] = (),
    produced_by: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read every dataset of an HDF5 artifact of ``kind`` into numpy; validate kind and contents."""
    import h5py

    p = _require_file(path, f"{kind} file", produced_by)
    if _sniff(p) in ("safetensors", "json"):
        raise ArtifactError(f"{p}: a {_sniff(p)} file where a ferd {kind} (HDF5) was expected; check the path")
    try:
        with h5py.File(p, "r") as fh:
            attrs = {k: _decode_attr(v) for k, v in fh.attrs.items()}
            found = attrs.get("kind")
            if found != kind:
                raise ArtifactError(f"{p}: a ferd {found!r} artifact where a {kind!r} was expected; check the path")
            if attrs.get("format_version") != FORMAT_VERSION:
                version = attrs.get("format_version")
                raise ArtifactError(f"{p}: {kind} format version {version} is not {FORMAT_VERSION}; rerun its stage")
            missing = [name for name in required if name not in fh]
            if missing:
                raise ArtifactError(f"{p}: {kind} lacks dataset(s) {', '.join(missing)}; rerun the stage that wrote it")
            arrays = {name: fh[name][()] for name in fh.keys()}
    except _H5_DAMAGE as exc:
        raise ArtifactError(
            f"{p}: unreadable HDF5 ({exc.__class__.__name__}: truncated or corrupt); delete it and rerun the stage"
        ) from None
    return arrays, attrs


def _decode_attr(v: Any) -> Any:
    import numpy as np

    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


# --------------------------------------------------------------------------------------------
# description (`ferd info`)


def _sniff(p: Path) -> str | None:
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000:
        with open(p, "rb") as fh:
            fh.seek(8)
            if fh.read(1) == b"{":
                return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return None


def describe(path: str | Path) -> dict[str, Any]:
    """What a ferd artifact holds: its format, metadata/attributes and tensors/datasets with shapes."""
    p = _require_file(path, "artifact", None)
    fmt = _sniff(p)
    if fmt == "safetensors":
        header = _read_safetensors_header(p)
        raw_meta = (header.get("__metadata__") or {}).get("ferd")
        meta = json.loads(raw_meta) if raw_meta else dict(header.get("__metadata__") or {})
        entries = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(header.items()) if k != "__metadata__"}
        return {"format": "safetensors", "meta": meta, "entries": entries}
    if fmt == "hdf5":
        import h5py

        try:
            with h5py.File(p, "r") as fh:
                meta = {k: _decode_attr(v) for k, v in fh.attrs.items()}
                entries = {k: {"dtype": str(fh[k].dtype), "shape": list(fh[k].shape)} for k in fh.keys()}
        except (*_H5_DAMAGE, AttributeError):  # AttributeError: a damaged dataset read back as a group
            raise ArtifactError(f"{p}: unreadable HDF5 (truncated or corrupt); delete it and rerun the stage") from None
        return {"format": "hdf5", "meta": meta, "entries": entries}
    if fmt == "json":
        return {"format": "json", "meta": load_json(p), "entries": {}}
    raise ArtifactError(f"{p}: not a ferd artifact (expected safetensors, HDF5 or JSON)")
