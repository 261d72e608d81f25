"""The robust teacher f^T (method reference §1, §9 #9): train it, or import a checkpoint.

Sources (``teacher.source``):
- ``train``: PGD adversarial training (Madry et al., ICLR 2018) on the dataset's train split. The
  only option for Fashion-MNIST and the offline default. Adversarial examples are crafted with the
  model frozen in eval mode, then the model trains on them in train mode.
- ``file:PATH``: a safetensors file (a ferd model artifact or a plain state dict) or a torch state
  dict read with ``torch.load(weights_only=True)`` (never unpickled); kuangliu and RobustBench key
  layouts, ``module.`` prefixes and ``{"state_dict"|"net"|"model": ...}`` wrappers are accepted.
- ``url:URL``: downloaded to a temporary file with a bounded timeout, its sha256 checked against
  ``teacher.sha256`` *before* anything is written, then read as a file.
- ``robustbench:MODEL_ID`` (CIFAR-10/100): the RobustBench checkpoint at
  ``<robustbench_dir>/<dataset>/Linf/<MODEL_ID>.pt`` (offline: put it there); when it is absent and
  the optional ``robustbench`` package is installed, it is downloaded there first through
  RobustBench's model zoo. The file is then read by us with ``weights_only=True``.

Whatever the source, the teacher is checked at the end on the test split (clean and PGD accuracy,
per class) and the result is stored in the artifact's metadata.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferd.artifacts import atomic_path, sha256_file
from ferd.config import Params, TeacherTrainConfig, as_dict
from ferd.errors import SourceError
from ferd.runtime import Progress, no_progress, torch_generator

ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}


@dataclass
class TeacherResult:
    state_dict: dict[str, Any]
    meta: dict[str, Any]
    train_log: list[dict[str, float]]


# --------------------------------------------------------------------------------------------
# adversarial training


def train_adversarially(
    model: Any,
    train: Any,
    cfg: TeacherTrainConfig,
    *,
    eps: float,
    seed: int,
    device: Any,
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress = no_progress,
) -> list[dict[str, float]]:
    """PGD-AT: minimise CE on PGD-``cfg.attack_steps`` examples (ε = ``eps``, α = step_size·ε).

    SGD with momentum and a per-step cosine learning-rate schedule. Returns one log row per epoch
    (mean adversarial training loss and accuracy). ``save_state(state)`` receives a plain dict after
    every epoch (model, optimiser, schedule, generators, log); ``resume=state`` continues from it.

    Under ``torch.distributed`` (``ferd.distributed``, more than one rank) the model is trained with
    DDP and global BatchNorm: every rank draws the same batches and PGD random starts as one process
    and takes its rows, crafts their PGD examples and scales its loss so that the averaged gradient
    is the global batch's mean; the losses and accuracies are summed over the ranks once per epoch.
    """
    import torch
    import torch.nn.functional as F

    from ferd import distributed
    from ferd.attacks import pgd

    if cfg.subset:
        g = torch_generator(seed, "teacher-subset")
        idx = torch.randperm(len(train), generator=g)[: cfg.subset].sort().values
        train = train.subset(idx)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    g_batches = torch_generator(seed, "teacher-batches")
    g_attack = torch_generator(seed, "teacher-attack")
    log = []
    step = 0
    start = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        g_batches.set_state(resume["g_batches"])
        g_attack.set_state(resume["g_attack"])
        log, step, start = list(resume["log"]), int(resume["step"]), int(resume["epoch"]) + 1
    if distributed.active():
        return _train_data_parallel(model, train, cfg, opt, sched, g_batches, g_attack, log=log, step=step, start=start,
                                    total=total, eps=eps, device=device, save_state=save_state, progress=progress)
    for epoch in range(start, cfg.epochs + 1):
        loss_sum = correct = seen = 0.0
        for x, y in train.batches(cfg.batch_size, shuffle=True, generator=g_batches):
            x, y = x.to(device), y.to(device)
            x_adv = pgd(model, x, y, eps=eps, alpha=cfg.attack_step_size * eps, steps=cfg.attack_steps,
                        random_start=True, generator=g_attack)
            model.train()
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise SourceError(f"teacher training diverged (loss {loss.item()}) at epoch {epoch}; lower teacher.train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            progress("adversarial training", step, total, {"epoch": epoch, "loss": loss_sum / seen, "adv_acc": correct / seen})
        log.append({"epoch": epoch, "adv_loss": loss_sum / seen, "adv_acc": correct / seen})
        if save_state is not None:
            save_state({"epoch": epoch, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "g_batches": g_batches.get_state(),
                        "g_attack": g_attack.get_state(), "log": log})
    model.eval()
    return log


def _train_data_parallel(
    model: Any, train: Any, cfg: TeacherTrainConfig, opt: Any, sched: Any, g_batches: Any, g_attack: Any, *,
    log: list[dict[str, float]], step: int, start: int, total: int, eps: float, device: Any,
    save_state: Callable[[dict[str, Any]], None] | None, progress: Progress,
) -> list[dict[str, float]]:
    """:func:`train_adversarially`'s loop over ranks (see there): same batches, schedule and state."""
    import torch
    import torch.nn.functional as F

    from ferd import distributed
    from ferd.attacks import pgd

    world = distributed.world_size()
    distributed.convert_batchnorm(model, device)
    ddp = distributed.data_parallel(model, device)
    for epoch in range(start, cfg.epochs + 1):
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct (this rank's rows)
        seen_here = 0
        for x, y in train.batches(cfg.batch_size, shuffle=True, generator=g_batches):
            sh = distributed.shard(len(y), allow_empty=True)
            noise = sh.rows(torch.rand(x.shape, generator=g_attack, dtype=x.dtype))  # the global batch's PGD starts
            x, y = sh.rows(x).to(device), sh.rows(y).to(device)
            if sh.n:
                x = pgd(model, x, y, eps=eps, alpha=cfg.attack_step_size * eps, steps=cfg.attack_steps,
                        random_start=True, start_noise=noise.to(device))
            model.train()
            logits = ddp(x)
            ce = F.cross_entropy(logits, y, reduction="sum")
            loss = ce * (world / sh.total)  # DDP averages over the ranks: the global batch's mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                sums += torch.stack([ce.detach().double(), (logits.argmax(1) == y).sum().double()])
            seen_here += sh.n
            progress("adversarial training", step, total, {"epoch": epoch})
        totals = torch.cat([sums, sums.new_tensor([float(seen_here)])])
        loss_sum, correct, seen = distributed.all_reduce_(totals).tolist()
        if not math.isfinite(loss_sum):
            raise SourceError(f"teacher training diverged (loss {loss_sum / seen}) at epoch {epoch}; lower teacher.train.lr")
        log.append({"epoch": epoch, "adv_loss": loss_sum / seen, "adv_acc": correct / seen})
        progress("adversarial training", step, total, {"epoch": epoch, "loss": loss_sum / seen, "adv_acc": correct / seen})
        if save_state is not None:
            save_state({"epoch": epoch, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "g_batches": g_batches.get_state(),
                        "g_attack": g_attack.get_state(), "log": log})
    distributed.revert_batchnorm(model)
    model.eval()
    return log


def robustness_check(
    model: Any, test: Any, *, eps: float, steps: int, batch_size: int, seed: int, device: Any, progress: Progress = no_progress
) -> dict[str, Any]:
    """Clean and PGD-``steps`` (α = ε/4, random start) accuracy, overall and per class."""
    from ferd.attacks import run_attack
    from ferd.metrics import per_class_accuracy

    out: dict[str, Any] = {}
    for name in ("clean", "pgd"):
        pred = run_attack(
            model, test.images(), test.y, name=name, eps=eps,
            alpha=eps / 4, steps=steps, batch_size=batch_size, generator=torch_generator(seed, f"teacher-check-{name}"),
            progress=lambda done, total, _n=name: progress(f"check: {_n}", done, total, {}),
        )
        out[f"{name}_acc"] = float((pred == test.y).double().mean())
        out[f"{name}_per_class"] = [float(a) for a in per_class_accuracy(pred, test.y, test.num_classes)]
    out["pgd_steps"] = steps
    out["eps"] = eps
    out["images"] = len(test)
    return out


# --------------------------------------------------------------------------------------------
# checkpoint sources


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Tensors of a checkpoint file, never unpickled: safetensors, or torch.load(weights_only=True).

    Only files that start like a torch checkpoint (the zip format's ``PK\x03\x04`` or a legacy
    pickle-protocol header ``\x80``) reach torch's restricted loader; anything else is "not a
    readable checkpoint". torch's own advice on a refused file (re-run with weights_only=False) is
    never passed on.
    """
    import torch

    from ferd.errors import is_unpickling_error

    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{p}: checkpoint not found; check teacher.source")
    with open(p, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except SafetensorError as exc:
            raise SourceError(f"{p}: unreadable safetensors checkpoint ({exc}); re-download it") from None
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise SourceError(f"{p}: not a readable torch checkpoint or safetensors file; check teacher.source or re-download it")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as exc:
        raise SourceError(f"{p}: not a readable torch checkpoint ({str(exc).splitlines()[0]}); re-download it") from None
    except Exception as exc:  # torch's weights-only refusal; anything else is a bug and propagates
        if not is_unpickling_error(exc):
            raise
        raise SourceError(
            f"{p}: refused to load: it holds pickled Python objects besides tensors and ferd never unpickles; "
            "save a plain state_dict (torch.save(model.state_dict(), ...)) or safetensors instead"
        ) from None
    if not isinstance(obj, dict):
        raise SourceError(f"{p}: checkpoint holds a {type(obj).__name__}, not a state dict")
    return obj


def download(url: str, sha256: str, *, timeout: float, dest_dir: Path) -> Path:
    """Stream ``url`` into a temp file in ``dest_dir`` and return it once its sha256 matches."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=".download.", suffix=".tmp", dir=dest_dir)[1])
    h = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310 (sha256-checked)
                for block in iter(lambda: resp.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(
                f"cannot download {url} ({reason}); check the URL and network, or use teacher.source: file:PATH"
            ) from None
        digest = h.hexdigest()
        if digest != sha256:
            raise SourceError(f"{url}: sha256 is {digest}, expected {sha256} (teacher.sha256); nothing was written")
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _robustbench_checkpoint(model_id: str, params: Params) -> Path:
    """RobustBench's checkpoint file for ``model_id``, downloaded by its zoo entry when absent.

    RobustBench's own ``load_model`` unpickles the file (``torch.load`` without ``weights_only``),
    so it is never called: we look the Google-Drive id up in its model zoo, download the file with
    its downloader into a temporary file, move it into place, and read it ourselves.
    """
    dataset = ROBUSTBENCH_DATASETS.get(params.data.name)
    if dataset is None:
        raise SourceError(f"robustbench: sources exist for cifar10 and cifar100, not {params.data.name}")
    path = Path(params.teacher.robustbench_dir) / dataset / "Linf" / f"{model_id}.pt"
    if path.is_file():
        return path
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import download_gdrive_new
    except ImportError:
        raise SourceError(
            f"{path}: RobustBench checkpoint not found and the robustbench extra is not installed; "
            "put the file there (offline) or `pip install -e .[robustbench]`"
        ) from None
    entry = model_dicts[BenchmarkDataset(dataset)][ThreatModel("Linf")].get(model_id)
    if entry is None:
        raise SourceError(f"robustbench: no Linf {dataset} model named {model_id!r} in RobustBench's model zoo")
    gdrive_id = entry.get("gdrive_id")
    if not isinstance(gdrive_id, str):
        raise SourceError(f"robustbench:{model_id} is an ensemble or timm model; use teacher.source: file:PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        download_gdrive_new(gdrive_id, tmp)
        if not tmp.stat().st_size:
            raise SourceError(f"robustbench:{model_id}: the download came back empty; check the network")
    return path


def import_checkpoint(params: Params, *, work_dir: Path) -> tuple[dict[str, Any], str]:
    """(raw tensors, source sha256) for a file:/url:/robustbench: source."""
    src = params.teacher.source
    kind, _, ref = src.partition(":")
    if kind == "file":
        path = Path(ref.removeprefix("//"))  # file:PATH and file:///abs/path
        digest = sha256_file(path) if path.is_file() else ""
        if params.teacher.sha256 and digest != params.teacher.sha256:
            raise SourceError(f"{path}: sha256 is {digest}, expected {params.teacher.sha256} (teacher.sha256)")
        return read_checkpoint(path), digest
    if kind == "url":
        tmp = download(ref, params.teacher.sha256, timeout=params.teacher.download_timeout, dest_dir=work_dir)
        try:
            return read_checkpoint(tmp), params.teacher.sha256
        finally:
            tmp.unlink(missing_ok=True)
    if kind == "robustbench":
        path = _robustbench_checkpoint(ref, params)
        return read_checkpoint(path), sha256_file(path)
    raise SourceError(f"teacher.source: unknown kind {kind!r}")  # unreachable: config validates


# --------------------------------------------------------------------------------------------
# the stage's one entry point


def fetch_teacher(
    params: Params,
    *,
    device: Any,
    work_dir: Path,
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress = no_progress,
) -> TeacherResult:
    """Obtain the teacher named by ``params.teacher`` and check it on the test split.

    ``resume`` / ``save_state``: the training run state (source ``train`` only), see :func:`train_adversarially`.
    """
    import torch

    from ferd.artifacts import model_meta
    from ferd.data import dataset_info, load_split
    from ferd.models import build_model
    from ferd.models.compat import adapt_state_dict

    tcfg = params.teacher
    info = dataset_info(params.data)
    c, h, _w = info.image_shape
    mean = list(tcfg.mean) if tcfg.mean is not None else [0.0] * c
    std = list(tcfg.std) if tcfg.std is not None else [1.0] * c
    if len(mean) not in (1, c):
        raise SourceError(f"teacher.mean has {len(mean)} values; {info.name} images have {c} channels")
    mean, std = (mean * c if len(mean) == 1 else mean), (std * c if len(std) == 1 else std)
    torch.manual_seed(tcfg.seed)
    model = build_model(
        tcfg.arch, num_classes=info.num_classes, in_channels=c, image_size=h, mean=mean, std=std, width=tcfg.width
    )
    log: list[dict[str, float]] = []
    source_sha = ""
    if tcfg.source == "train":
        train = load_split(params.data, "train")
        log = train_adversarially(
            model, train, tcfg.train, eps=params.data.eps, seed=tcfg.seed, device=device, resume=resume,
            save_state=save_state, progress=progress,
        )
    else:
        raw, source_sha = import_checkpoint(params, work_dir=work_dir)
        model.load_state_dict(adapt_state_dict(raw, model))
    model.to(device).eval()

    test = load_split(params.data, "test")
    if tcfg.eval_subset:
        from ferd.data import class_balanced_subset

        per_class = max(1, tcfg.eval_subset // info.num_classes)
        test = class_balanced_subset(test, per_class, seed=tcfg.seed)
    check = robustness_check(
        model, test, eps=params.data.eps, steps=tcfg.eval_pgd_steps, batch_size=256, seed=tcfg.seed,
        device=device, progress=progress,
    )
    meta = model_meta(
        arch=tcfg.arch,
        num_classes=info.num_classes,
        input_shape=info.image_shape,
        mean=mean,
        std=std,
        dataset=info.name,
        source=tcfg.source,
        width=tcfg.width,
        class_names=list(info.class_names),
        source_sha256=source_sha,
        eps=params.data.eps,
        seed=tcfg.seed,
        teacher_params=as_dict(tcfg),
        check=check,
        train_log=log,
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return TeacherResult(state_dict=state, meta=meta, train_log=log)
