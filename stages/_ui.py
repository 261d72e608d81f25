"""What every command shares: params loading, error handling, the config table, progress bars.

Output goes to stderr through rich (stdout stays free for data a user may pipe). A ``FerdError``
becomes one line on stderr and exit code 1; a ``FerdWarning`` one ``warning:`` line, and the
command goes on; anything else is a bug and keeps its traceback. There is deliberately no
``except Exception``: it would turn ``typer.Exit`` into success and let DVC cache a failed stage.

Data parallelism (docs/distributed.md): with ``runtime.nproc`` > 1 and no launcher around it, a heavy
stage runs itself again as ``nproc`` ranks (:func:`launch_ranks`) and prints the one error line of a
failed rank; under a launcher (torchrun, or that relaunch) :func:`setup_torch` joins the process
group, only rank 0 prints, and only rank 0 writes artifacts and run state (:func:`rank0_writes`,
:func:`checkpointer`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
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


def fail(message: str, kind: str = "error") -> None:
    """Print one error line on stderr and exit 1.

    A rank of a distributed run (``RANK`` set by the launcher) also records the line for the
    launcher (``ferd.distributed.record_failure``); one that ``ferd`` launched itself leaves the
    printing to the launching process, which prints the first failed rank's line alone.
    """
    first = " ".join(str(message).split())
    if "RANK" in os.environ:  # a rank (torch is imported by then)
        from ferd.distributed import launched_by_ferd, record_failure

        record_failure(first, kind)
        if launched_by_ferd():
            raise typer.Exit(code=1)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            first = f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: {first}"
    print(f"error: {first}", file=sys.stderr)
    raise typer.Exit(code=1)


def _lost_peer_errors() -> tuple[type[BaseException], ...]:
    """torch.distributed's errors for a rank that died or a collective that broke (when torch is loaded)."""
    dist = sys.modules.get("torch.distributed")
    error = getattr(dist, "DistError", None) if dist is not None else None
    return (error,) if isinstance(error, type) else ()


def handles_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``FerdError`` into a one-line message and exit code 1 (nothing else is caught); show every
    ``FerdWarning`` as one ``warning:`` line on stderr (other warnings go where they always go).

    In a rank of a distributed run, a collective that fails because another rank died (torch's
    ``DistError``) is reported the same way, as a lost peer: the launcher names the rank that failed.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.simplefilter("always", FerdWarning)
            warnings.showwarning = _show_ferd_warnings(warnings.showwarning)
            try:
                return func(*args, **kwargs)
            except FerdError as exc:
                fail(str(exc))
            except _lost_peer_errors() as exc:
                if "RANK" not in os.environ:
                    raise
                fail(f"a collective operation failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                     "peer")

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


#: The stages that run as several ranks under torch.distributed (docs/distributed.md).
RANKED_STAGES = ("fetch-teacher", "synth-fae", "distill")


def setup_torch(params: Any, stage: str, seed: int | None = None) -> Any:
    """Threads, torch's global seed (the run ``seed`` unless the stage has its own), device; returns the torch.device.

    Refuses ``runtime.precision: bf16`` unless the device resolves to CUDA. Under a launcher (torchrun,
    or :func:`launch_ranks`) it joins the process group (gloo on the CPU, NCCL on CUDA, this rank on
    ``cuda:LOCAL_RANK``), splits ``runtime.threads`` between the ranks of this machine, silences every
    rank but rank 0, and leaves the group when the command ends. Only ``RANKED_STAGES`` run as
    several ranks: any other stage under a launcher of more than one process is refused.
    """
    from ferd.errors import ConfigError
    from ferd.runtime import check_precision, configure_torch, resolve_device

    threads = params.runtime.threads
    if "RANK" in os.environ:
        from ferd.distributed import local_world_size, threads_per_rank

        threads = threads_per_rank(threads, local_world_size())
    configure_torch(threads, params.seed if seed is None else seed, stage)
    device = resolve_device(params.runtime.device)
    check_precision(params.runtime.precision, device)
    from ferd.distributed import init_process_group, is_main, shutdown, under_launcher

    if under_launcher() and stage not in RANKED_STAGES and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError(f"ferd {stage.split('-')[0] if stage.startswith('evaluate') else stage} runs in one process; "
                          f"run it without torchrun (only {', '.join(RANKED_STAGES)} run as several)")
    if under_launcher() and stage in RANKED_STAGES:
        device = init_process_group(device)
        atexit.register(shutdown)
        console.quiet = not is_main()
    return device


def launch_ranks(
    ctx: typer.Context, params: Any, stage: str, *, batches: Mapping[str, int], when: bool = True
) -> bool:
    """Run this command as ``runtime.nproc`` ranks on this machine and return True (the caller then
    returns at once), when ``nproc`` > 1, ``when`` holds and no launcher started this process;
    otherwise False. The ranks rerun the same command line (``python -m stages.cli ...``) under torch's
    elastic launcher (``ferd.distributed.launch``); a failed rank raises one ``FerdError`` line.
    ``batches`` (param name -> batch size) are split over the ranks: each must give every rank a row."""
    nproc = params.runtime.nproc
    if nproc <= 1 or not when or "RANK" in os.environ:
        return False
    from ferd.errors import ConfigError

    for name, size in batches.items():
        if size < nproc:
            raise ConfigError(f"{name} is {size} but {nproc} processes share it (one row each at least); "
                              f"raise {name} or lower runtime.nproc")
    import torch

    from ferd.distributed import launch
    from ferd.runtime import resolve_device

    device = resolve_device(params.runtime.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"runtime.nproc is {nproc} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                          "one per process; lower runtime.nproc")
    backend = "NCCL" if device.type == "cuda" else "gloo"
    console.print(f"{stage}: {nproc} processes (runtime.nproc), torch.distributed with {backend}")
    launch([sys.executable, "-m", "stages.cli", *_command_line(ctx)], nproc, params.runtime.threads)
    return True


def _command_line(ctx: typer.Context) -> list[str]:
    """The arguments that run this command again: the global options, the command, its options."""
    opts = global_options(ctx)
    args = ["--params", str(opts.params)]
    if opts.device is not None:
        args += ["--device", opts.device]
    if opts.threads is not None:
        args += ["--threads", str(opts.threads)]
    args.append(ctx.info_name or "")
    for param in ctx.command.params:  # typer's (vendored click) parameters
        value = ctx.params.get(param.name)
        if getattr(param, "param_type_name", None) != "option" or value is None:
            continue
        if getattr(param, "is_flag", False):
            flag = param.opts[0] if value else (param.secondary_opts[0] if param.secondary_opts else None)
            if flag:
                args.append(flag)
        else:
            args += [param.opts[0], str(value)]
    return args


def rank0_writes() -> bool:
    """Whether this process writes the stage's artifacts: after every rank has finished computing
    (a barrier), rank 0 only; always in one process."""
    from ferd.distributed import barrier, is_main

    barrier()
    return is_main()


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
    if "RANK" in os.environ:
        from ferd.distributed import world_size

        if world_size() > 1:
            import torch.distributed as dist

            table.add_row("ranks (torch.distributed)", f"{world_size()} ({dist.get_backend()}); rank 0 prints and writes")
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
    """A ``save_state`` callback that saves every ``every`` epochs (None without a run state, and on
    every rank but rank 0 of a distributed run: rank 0 alone writes the run state)."""
    if run_state is None or not _is_main():
        return None

    def save(state: Any) -> None:
        if epoch_of(state) % every == 0:
            run_state.save(state)

    return save


def resume_from(run_state: Any, stage: str, epoch_of: Callable[[Any], int] | None = None) -> Any:
    """The saved state to continue from (and say so), or None.

    In a distributed run every rank loads the state itself; with ``epoch_of`` the ranks first check
    that they all found the same one (a run-state folder that not every node sees is an error).
    """
    if run_state is None:
        return None
    state = run_state.load()
    if epoch_of is not None and "RANK" in os.environ:
        import torch

        from ferd.distributed import all_gather_stack, world_size

        if world_size() > 1:
            found = all_gather_stack(torch.tensor(-1 if state is None else int(epoch_of(state)))).tolist()
            if len(set(found)) > 1:
                def says(r: int) -> str:
                    return f"rank {r} finds no run state" if found[r] < 0 else f"rank {r} resumes after epoch {found[r]}"

                odd = next(r for r, v in enumerate(found) if v != found[0])
                raise FerdError(f"{says(0)} in {run_state.dir} but {says(odd)}: put runtime.state_dir on a filesystem "
                                "every node shares (or copy it to every node), or delete it to start over")
    if state is not None:
        console.print(f"{stage}: resuming from the run state in {run_state.dir} (delete it to start over)")
    return state


def _is_main() -> bool:
    if "RANK" not in os.environ:
        return True
    from ferd.distributed import is_main

    return is_main()
