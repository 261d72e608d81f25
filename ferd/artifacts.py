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
mean, std, dataset, source, and (format version 2) ``digest``.

Integrity (format version 2, issue 12): a damaged artifact never loads silently. Every read either
returns exactly what was written or raises an ``ArtifactError`` naming the file and the stage that
rewrites it.
- Models: ``digest`` = sha256 over the rest of the ferd metadata (canonical JSON) and every tensor's
  name, dtype, shape and bytes; recomputed from what was loaded and compared on every load.
- HDF5 image sets: written with ``libver=("v110", "v110")`` (superblock v3, v2 object headers, fixed
  array / single-chunk indexes, checksummed fractal heaps: all metadata, attributes included, carries
  a checksum that HDF5 verifies), every dataset chunked with the ``fletcher32`` filter (checked on
  every chunk read), and every string attribute fixed-length, so it lives in the checksummed object
  header rather than the unchecksummed global heap.
- Format version 1 files (no digest, no checksums) still load, with a ``FerdWarning`` saying they are
  unverified and how to rewrite them.
The format is documented in docs/artifacts.md.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ferd.errors import ArtifactError, ConfigError, FerdWarning

#: Written by this code: 2 = checksummed (model digest, HDF5 fletcher32 + v110 format).
FORMAT_VERSION = 2
#: Read by this code; version 1 (no checksums) with a warning.
READABLE_VERSIONS = (1, 2)
#: The stage that writes each HDF5 kind (named in error messages when the caller gives none).
PRODUCED_BY = {"probe": "probe", "pool": "synth-fae", "utae": "gen-utae"}
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


def _rerun(produced_by: str | None) -> str:
    return f"rerun `ferd {produced_by}` (or `dvc repro`)" if produced_by else "rerun the stage that wrote it"


def _damaged(p: Path, what: str, produced_by: str | None) -> ArtifactError:
    return ArtifactError(f"{p}: damaged ({what}); delete it and {_rerun(produced_by)}")


def _warn_unverified(p: Path, what: str, produced_by: str | None) -> None:
    how = f"rerun `ferd {produced_by}` (or `dvc repro -f -s {produced_by}`)" if produced_by else "rerun the stage that wrote it"
    warnings.warn(f"{p}: format version 1 {what} without checksums, loaded unverified; {how} to rewrite it with checksums",
                  FerdWarning, stacklevel=3)


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


#: Key of the model digest inside the ``ferd`` metadata JSON (format version 2).
DIGEST_KEY = "digest"


def tensors_digest(text: str, tensors: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of ``text`` and of every tensor's name, dtype, shape and bytes, in name order.

    Each text part is preceded by its byte length and a tensor's byte count follows from its dtype and
    shape, so two different inputs never feed sha256 the same bytes.
    """
    import hashlib

    import torch

    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        part(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _model_digest(meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """The digest of a model: its metadata (sorted JSON, without the digest) and its tensors."""
    return tensors_digest(json.dumps(dict(meta), sort_keys=True, allow_nan=False), tensors)


def save_model(path: str | Path, state_dict: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Write a float32 state dict + sorted-JSON metadata with its digest, atomically (byte-stable).

    A ``digest`` already in ``meta`` (metadata read from another file) is replaced by the new one.
    """
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
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    digest = _model_digest(body, tensors)
    body[DIGEST_KEY] = digest
    data = st_save(tensors, metadata={"ferd": json.dumps(body, sort_keys=True, allow_nan=False)})
    write_bytes_atomic(path, data)


def _read_safetensors_header(p: Path, produced_by: str | None = None) -> dict[str, Any]:
    """Parse the safetensors header ourselves to give precise errors for truncated/corrupt files."""
    size = p.stat().st_size
    rerun = f"delete it and {_rerun(produced_by)}"
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{p}: truncated safetensors file ({size} bytes); {rerun}")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise ArtifactError(f"{p}: corrupt or truncated safetensors header; {rerun}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{p}: corrupt safetensors header (not JSON); {rerun}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ArtifactError(f"{p}: corrupt safetensors header; {rerun}")
    try:
        end = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):  # an entry without valid data_offsets
        raise ArtifactError(f"{p}: corrupt safetensors header (bad tensor entry); {rerun}") from None
    if end != size:
        raise ArtifactError(f"{p}: truncated safetensors file ({size} of {end} bytes); {rerun}")
    return header


def _load_tensors(p: Path, produced_by: str | None) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except SafetensorError as exc:
        raise _damaged(p, f"unreadable safetensors data: {exc}", produced_by) from None


def _read_model(path: str | Path, produced_by: str | None, *, tensors: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(state dict or None, metadata without the digest). With ``tensors``, the weights are loaded and
    both are checked against the digest before anything else looks at them."""
    p = _require_file(path, "model file", produced_by)
    if p.suffix != ".safetensors" and _sniff(p) != "safetensors":
        raise ArtifactError(f"{p}: expected a ferd model (.safetensors), got {_sniff(p) or 'an unknown file'}")
    header = _read_safetensors_header(p, produced_by)
    raw = (header.get("__metadata__") or {}).get("ferd")
    if raw is None:
        damaged = ("" if produced_by in (None, "fetch-teacher")
                   else f"; if it is a damaged ferd model, delete it and {_rerun(produced_by)}")
        raise ArtifactError(f"{p}: safetensors file without ferd metadata; import it with `ferd fetch-teacher` "
                            f"(teacher.source: file:{p}){damaged}")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        meta = None
    if not isinstance(meta, dict):
        raise _damaged(p, "corrupt ferd metadata", produced_by)
    digest = meta.pop(DIGEST_KEY, None)
    state = _load_tensors(p, produced_by) if tensors else None
    if state is not None and digest is not None:
        try:
            actual = _model_digest(meta, state)
        except (TypeError, ValueError):  # NaN/inf in the metadata: never written by save_model
            actual = None
        if actual != digest:
            raise _damaged(p, "checksum mismatch: weights or metadata differ from what was written", produced_by)
    if meta.get("kind") != "model":
        raise ArtifactError(f"{p}: a ferd {meta.get('kind')!r} artifact, not a model; check the path")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ArtifactError(f"{p}: model format version {version} is not one this ferd reads "
                            f"({', '.join(map(str, READABLE_VERSIONS))}); {_rerun(produced_by)}")
    if digest is None and version >= 2:
        raise _damaged(p, f"format version {version} model without its digest", produced_by)
    missing = [k for k in MODEL_META_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{p}: model metadata lacks {', '.join(missing)}; {_rerun(produced_by)}")
    if digest is None:
        _warn_unverified(p, "model", produced_by)
    return state, meta


def read_model_meta(path: str | Path, *, produced_by: str | None = "fetch-teacher") -> dict[str, Any]:
    """Validated metadata of a model artifact, from the header alone.

    The digest is not checked here (that needs the weights): use :func:`load_model_state` or
    :func:`load_model` for anything that trusts the values.
    """
    return _read_model(path, produced_by, tensors=False)[1]


def load_model_state(path: str | Path, *, produced_by: str | None = "fetch-teacher") -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, metadata) of a model artifact, verified against its digest and validated."""
    state, meta = _read_model(path, produced_by, tensors=True)
    assert state is not None
    return state, meta


def load_model(path: str | Path, *, device: Any = "cpu", produced_by: str | None = "fetch-teacher"):
    """Build the network a model artifact describes, load its weights, return (model in eval mode, meta)."""
    from ferd.models import ARCH_REGISTRY, build_model

    state, meta = load_model_state(path, produced_by=produced_by)
    if not isinstance(meta["arch"], str) or meta["arch"] not in ARCH_REGISTRY:
        raise ArtifactError(f"{path}: unknown architecture {meta['arch']!r} in the model metadata (valid: "
                            f"{', '.join(sorted(ARCH_REGISTRY))}); the file is corrupt, {_rerun(produced_by)}")
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
        raise ArtifactError(f"{path}: model metadata describes no buildable network ({exc}); {_rerun(produced_by)}"
                            ) from None
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) + [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if bad:
        raise ArtifactError(
            f"{path}: weights do not match arch {meta['arch']!r} ({len(bad)} keys differ, e.g. {bad[0]}); "
            f"the file is inconsistent, {_rerun(produced_by)}"
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
    """Write numpy arrays as HDF5 datasets plus provenance attributes, atomically, byte-stably, checksummed.

    Every dataset is chunked (``chunk_rows`` rows along the first axis), shuffled, gzip-compressed and
    fletcher32-checksummed; an axis of length 0 is made extendible (HDF5 wants chunks no larger than
    fixed axes). Attribute values that are not numbers, booleans or strings are stored as sorted
    JSON strings; strings are stored fixed-length (in the checksummed object header).
    """
    import h5py
    import numpy as np

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as fh:
            _set_attr(fh, "kind", kind)
            _set_attr(fh, "format_version", FORMAT_VERSION)
            for key in sorted(attrs):
                if key not in ("kind", "format_version"):  # set above: the writer's, never a copied file's
                    _set_attr(fh, key, attrs[key])
            for name in sorted(arrays):
                arr = np.ascontiguousarray(arrays[name])  # at least 1-d
                chunks = (max(1, min(chunk_rows, arr.shape[0])), *(max(1, s) for s in arr.shape[1:]))
                fh.create_dataset(name, data=arr, chunks=chunks, maxshape=tuple(s or None for s in arr.shape),
                                  compression="gzip", compression_opts=4, shuffle=True, fletcher32=True, track_times=False)


def _set_attr(fh: Any, key: str, value: Any) -> None:
    import h5py
    import numpy as np

    if isinstance(value, bool | int | float | np.bool_ | np.integer | np.floating):
        fh.attrs[key] = value
        return
    data = (value if isinstance(value, str) else json.dumps(value, sort_keys=True, allow_nan=False)).encode()
    if data.endswith(b"\0"):  # a fixed-length string drops trailing NULs
        raise ValueError(f"attribute {key!r} ends with a NUL character")
    fh.attrs.create(key, data=np.array(data, dtype=h5py.string_dtype("utf-8", max(1, len(data)))))


#: What h5py raises for a damaged file, depending on which structure the damage hit (a fuzzed format
#: version 1 pool gave all of them: truncated superblock, bad object header, bad symbol table, a
#: dataset turned group; UnicodeDecodeError, from a damaged string attribute, is a ValueError).
_H5_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)


def _h5_reason(exc: BaseException) -> str:
    """What HDF5 said, shortly: the last parenthesised part of h5py's message ("incorrect metadata
    checksum after all read attempts", "truncated file: eof = ...", ...), else the whole message."""
    text = " ".join(str(exc).split())
    parts = re.findall(r"\(([^()]+)\)", text)
    reason = parts[-1] if parts else text or exc.__class__.__name__
    return reason if len(reason) <= 120 else reason[:117] + "..."


def load_h5(
    path: str | Path,
    *,
    kind: str,
    required: Sequence[str] = (),
    produced_by: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read every dataset of an HDF5 artifact of ``kind`` into numpy; validate kind, version and checksums.

    ``produced_by`` (the stage named in error messages) defaults to the stage that writes ``kind``.
    """
    import h5py

    produced_by = produced_by or PRODUCED_BY.get(kind)
    p = _require_file(path, f"{kind} file", produced_by)
    if _sniff(p) in ("safetensors", "json"):
        raise ArtifactError(f"{p}: a {_sniff(p)} file where a ferd {kind} (HDF5) was expected; check the path")
    try:
        fh = h5py.File(p, "r")
    except _H5_DAMAGE as exc:
        raise ArtifactError(f"{p}: unreadable HDF5 (truncated or corrupt: {_h5_reason(exc)}); delete it and "
                            f"{_rerun(produced_by)}") from None
    with fh:
        try:
            attrs = {k: _decode_attr(v) for k, v in fh.attrs.items()}
            names = list(fh.keys())
            superblock = fh.id.get_create_plist().get_version()[0]
        except _H5_DAMAGE as exc:
            raise _damaged(p, f"unreadable metadata: {_h5_reason(exc)}", produced_by) from None
        found = attrs.get("kind")
        if found != kind:
            raise ArtifactError(f"{p}: a ferd {found!r} artifact where a {kind!r} was expected; check the path")
        version = attrs.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ArtifactError(f"{p}: {kind} format version {version} is not one this ferd reads "
                                f"({', '.join(map(str, READABLE_VERSIONS))}); {_rerun(produced_by)}")
        checked = version >= 2
        if checked and superblock < 2:
            raise _damaged(p, f"format version {version} file without a checksummed superblock", produced_by)
        missing = [name for name in required if name not in names]
        if missing:
            raise ArtifactError(f"{p}: {kind} lacks dataset(s) {', '.join(missing)}; {_rerun(produced_by)}")
        arrays = {name: _read_dataset(fh, name, p, checked, produced_by) for name in names}
    if not checked:
        _warn_unverified(p, kind, produced_by)
    return arrays, attrs


#: deflate expands at most 1032-fold; a dataset claiming more than this per file byte is damaged
#: (a version 1 file, whose shapes carry no checksum, could otherwise ask for terabytes)
_MAX_EXPANSION = 1100


def _read_dataset(fh: Any, name: str, p: Path, checked: bool, produced_by: str | None) -> Any:
    """One dataset as numpy; in a checksummed file it must carry fletcher32, which HDF5 verifies per chunk."""
    import h5py

    try:
        ds = fh[name]
        if not isinstance(ds, h5py.Dataset):
            raise _damaged(p, f"{name} is not a dataset", produced_by)
        if checked and not ds.fletcher32:
            raise _damaged(p, f"dataset {name} has no checksum", produced_by)
        size = p.stat().st_size
        if ds.nbytes > _MAX_EXPANSION * size + (1 << 20):
            raise _damaged(p, f"dataset {name} claims {ds.nbytes} bytes in a file of {size}", produced_by)
        return ds[()]
    except _H5_DAMAGE as exc:  # fletcher32 failing is "filter returned failure during read"
        reason = _h5_reason(exc)
        what = "checksum mismatch" if "filter" in reason.lower() or "checksum" in reason.lower() else reason
        raise _damaged(p, f"{what} in dataset {name}", produced_by) from None


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
        try:
            meta = json.loads(raw_meta) if raw_meta else dict(header.get("__metadata__") or {})
        except (json.JSONDecodeError, TypeError, ValueError):
            raise ArtifactError(f"{p}: corrupt ferd metadata; delete it and rerun the stage that wrote it") from None
        entries = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(header.items()) if k != "__metadata__"}
        return {"format": "safetensors", "meta": meta, "entries": entries}
    if fmt == "hdf5":
        import h5py

        try:
            with h5py.File(p, "r") as fh:
                meta = {k: _decode_attr(v) for k, v in fh.attrs.items()}
                entries = {k: {"dtype": str(fh[k].dtype), "shape": list(fh[k].shape)} for k in fh.keys()}
        except _H5_DAMAGE:  # AttributeError: a damaged dataset read back as a group
            raise ArtifactError(f"{p}: unreadable HDF5 (truncated or corrupt); delete it and rerun the stage") from None
        return {"format": "hdf5", "meta": meta, "entries": entries}
    if fmt == "json":
        return {"format": "json", "meta": load_json(p), "entries": {}}
    raise ArtifactError(f"{p}: not a ferd artifact (expected safetensors, HDF5 or JSON)")
