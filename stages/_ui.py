"""What every command shares: params loading, error handling, the config table, progress bars.

Output goes to stderr through rich (stdout stays free for data a user may pipe). A ``FerdError``
becomes one line on stderr and exit code 1; a ``FerdWarning`` one ``warning:`` line, and the
command goes on; anything else is a bug and keeps its traceback. There is deliberately no
``except Exception``: it would turn ``typer.Exit`` into success and let DVC cache a failed stage.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ferd.errors import FerdError, FerdWarning

console = Console(stderr=True, highlight=False)


@dataclass(frozen=True)
class GlobalOptions:
    params: Path = Path("params.yaml")
    device: str | None = None
    threads: int | None = None


def global_options(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def fail(message: str) -> None:
    """Print one error line on stderr and exit 1."""
    first = " ".join(str(message).split())
    print(f"error: {first}", file=sys.stderr)
    raise typer.Exit(code=1)


def handles_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``FerdError`` into a one-line message and exit code 1 (nothing else is caught); show every
    ``FerdWarning`` as one ``warning:`` line on stderr (other warnings go where they always go)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.simplefilter("always", FerdWarning)
            warnings.showwarning = _show_ferd_warnings(warnings.showwarning)
            try:
                return func(*args, **kwargs)
            except FerdError as exc:
                fail(str(exc))

    return wrapper


def _show_ferd_warnings(other: Callable[..., None]) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, FerdWarning):
            console.print(Text.assemble(("warning:", "yellow"), " ", " ".join(str(message).split())), soft_wrap=True)
        else:
            other(message, category, filename, lineno, file, line)

    return show


class DeclaredParams:
    """The validated params, restricted to the sections a stage declares in dvc.yaml.

    Reading an undeclared section raises at once: a stage whose code depends on params DVC does
    not know about would not be rerun when they change. ``runtime`` is always readable (speed only).
    """

    def __init__(self, params: Any, sections: tuple[str, ...]) -> None:
        self._params = params
        self._sections = frozenset(s for s in sections if "." not in s) | {"runtime"}
        # "distill.schedule": only that key of the section is declared
        self._keys: dict[str, set[str]] = {}
        for entry in sections:
            if "." in entry:
                section, key = entry.split(".", 1)
                self._keys.setdefault(section, set()).add(key)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._sections:
            return getattr(self._params, name)
        if name in self._keys:
            return DeclaredParams(getattr(self._params, name), tuple(self._keys[name]))
        raise RuntimeError(f"stage reads params {name!r} without declaring it (add it to SECTIONS and dvc.yaml)")


def load_stage_params(ctx: typer.Context, sections: tuple[str, ...]) -> Any:
    """params.yaml with the global --device/--threads overrides applied, limited to ``sections``."""
    from ferd.config import load_params

    opts = global_options(ctx)
    overrides: dict[str, Any] = {}
    if opts.device is not None:
        overrides["runtime.device"] = opts.device
    if opts.threads is not None:
        overrides["runtime.threads"] = opts.threads
    return DeclaredParams(load_params(opts.params, overrides), sections)


def setup_torch(params: Any, stage: str, seed: int | None = None) -> Any:
    """Threads, torch's global seed (the run ``seed`` unless the stage has its own), device; returns the torch.device.

    Refuses ``runtime.precision: bf16`` unless the device resolves to CUDA.
    """
    from ferd.runtime import check_precision, configure_torch, resolve_device

    configure_torch(params.runtime.threads, params.seed if seed is None else seed, stage)
    device = resolve_device(params.runtime.device)
    check_precision(params.runtime.precision, device)
    return device


def _resolve(params: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        params = getattr(params, part)
    return params


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _flatten(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
    else:
        yield prefix, value


def print_config(stage: str, params: Any, sections: tuple[str, ...], device: Any = None) -> None:
    """The resolved configuration of the sections a stage reads, as one rich table."""
    table = Table(title=f"ferd {stage}: resolved configuration", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value")
    for section in sections:
        for key, value in _flatten(section, _resolve(params, section)):
            if key.startswith("data.synthetic.") and params.data.name != "synthetic":
                continue  # only meaningful for the generated dataset
            table.add_row(key, repr(value) if isinstance(value, str) else str(value))
    if device is not None:
        table.add_row("device (resolved)", str(device))
    console.print(table)


class RichProgress:
    """Adapter from ferd's ``progress(task, done, total, info)`` callback to a rich progress bar.

    Without a terminal (DVC, CI, a log file) a live bar shows nothing, so there it prints one line
    per task each time another tenth of it is done.
    """

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
        )
        self._tasks: dict[str, Any] = {}
        self._live = console.is_terminal
        self._printed: dict[str, int] = {}
        self._start = time.perf_counter()

    def __call__(self, task: str, done: int, total: int, info: Mapping[str, float]) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        if not self._live:
            tenth = (10 * done) // max(total, 1)
            if tenth > self._printed.get(task, 0) or done == total:
                if self._printed.get(task) != 10:
                    elapsed = time.perf_counter() - self._start
                    console.print(f"{task}: {done}/{total}  {text}  [{elapsed:.0f} s]")
                self._printed[task] = tenth
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total, info=text)
        self._progress.update(self._tasks[task], completed=done, total=total, info=text)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()


@contextmanager
def timed(what: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    console.print(f"[green]{what}[/] in {time.perf_counter() - start:.1f} s")


def load_teacher(params: Any, path: Path, device: Any) -> tuple[Any, dict, Any]:
    """The teacher artifact, checked against the configured dataset: (model in eval mode, meta, DatasetInfo)."""
    from ferd.artifacts import load_model, require_compatible
    from ferd.data import dataset_info

    info = dataset_info(params.data)
    model, meta = load_model(path, device=device, produced_by="fetch-teacher")
    require_compatible(meta, path, num_classes=info.num_classes, image_shape=info.image_shape, what=info.name)
    return model, meta, info


def load_pool(path: Path, info: Any, required: tuple[str, ...]) -> tuple[dict, dict]:
    """The FAE pool, checked against the teacher's classes and image shape, and its images (float32 in
    [0, 1]) and labels (one class index per image): (arrays, attrs)."""
    import numpy as np

    from ferd.artifacts import load_h5
    from ferd.errors import ArtifactError

    arrays, attrs = load_h5(path, kind="pool", required=required, produced_by="synth-fae")
    x, y = arrays["x"], arrays["y"]
    shape = list(x.shape[1:])
    if attrs.get("num_classes") != info.num_classes or shape != list(info.image_shape):
        raise ArtifactError(f"{path}: pool of {attrs.get('num_classes')} classes of {shape} images does not match the "
                            f"teacher ({info.num_classes} of {list(info.image_shape)}); rerun `ferd synth-fae`")
    if x.dtype != np.float32:
        raise ArtifactError(f"{path}: pool images are {x.dtype}, expected float32 in [0, 1]; rerun `ferd synth-fae`")
    if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):  # NaN fails both comparisons
        raise ArtifactError(f"{path}: pool images must lie in [0, 1], found values from {x.min():g} to {x.max():g}; "
                            "rerun `ferd synth-fae`")
    if y.dtype.kind not in "iu" or y.shape != x.shape[:1]:
        raise ArtifactError(f"{path}: pool labels must be {len(x)} integers, got {y.dtype} {list(y.shape)}; "
                            "rerun `ferd synth-fae`")
    if y.size and not (y.min() >= 0 and y.max() < info.num_classes):
        raise ArtifactError(f"{path}: pool labels must lie in [0, {info.num_classes}), found {y.min()} to {y.max()}; "
                            "rerun `ferd synth-fae`")
    return arrays, attrs


def stage_run_state(params: Any, stage: str, sections: tuple[str, ...], inputs: list[Path]) -> Any:
    """The stage's :class:`ferd.runstate.RunState` (None when ``runtime.checkpoint_every`` is 0).

    Keyed by the declared params and the bytes of ``inputs``, so only an identical rerun resumes.
    """
    from ferd.artifacts import sha256_file
    from ferd.config import as_dict
    from ferd.runstate import RunState

    if params.runtime.checkpoint_every == 0:
        return None
    values = {}
    for dotted in sections:
        value = _resolve(params, dotted)
        values[dotted] = as_dict(value) if dataclasses.is_dataclass(value) else value
    digests = {str(p): sha256_file(p) for p in inputs if Path(p).is_file()}
    return RunState(params.runtime.state_dir, stage, {"params": values, "inputs": digests})


def checkpointer(run_state: Any, every: int, epoch_of: Callable[[Any], int]) -> Callable[[Any], None] | None:
    """A ``save_state`` callback that saves every ``every`` epochs (None without a run state)."""
    if run_state is None:
        return None

    def save(state: Any) -> None:
        if epoch_of(state) % every == 0:
            run_state.save(state)

    return save


def resume_from(run_state: Any, stage: str) -> Any:
    """The saved state to continue from (and say so), or None."""
    if run_state is None:
        return None
    state = run_state.load()
    if state is not None:
        console.print(f"{stage}: resuming from the run state in {run_state.dir} (delete it to start over)")
    return state
