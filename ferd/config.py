"""params.yaml -> frozen, validated dataclasses (one per section).

Validation happens once, here: types (an int is not a bool, a float accepts an int), ranges
(``field(metadata=...)`` with ``ge``/``gt``/``le``/``lt``), closed sets (``Literal``), nested
sections, and unknown keys (an error that names the closest valid key). This module does not import
torch, so the command line stays fast.

Sections: ``seed``, ``data``, ``teacher``, ``probe``, ``reweight``, ``fae``, ``utae``, ``distill``,
``evaluate``; each stage module's ``SECTIONS`` lists what it reads and ``dvc.yaml`` declares exactly
that (a test checks it). ``runtime`` (device, threads, precision, run state, processes) changes speed,
not results (bf16 changes floats, see docs/gpu.md; N processes round differently, see
docs/distributed.md), and is deliberately not a DVC dependency.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ferd.errors import ConfigError

#: Architectures in ``ferd.models`` (kept here so config validation needs no torch; a test checks
#: that the registry and this list agree).
ARCHITECTURES = (
    "cnn",
    "resnet8",
    "resnet20",
    "resnet18",
    "preactresnet18",
    "preactresnet34",
    "mobilenetv2",
    "wrn34_10",
    "wrn34_20",
)

DatasetName = Literal["fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "synthetic"]
ArchName = Literal[
    "cnn",
    "resnet8",
    "resnet20",
    "resnet18",
    "preactresnet18",
    "preactresnet34",
    "mobilenetv2",
    "wrn34_10",
    "wrn34_20",
]


def rng(default: Any, **bounds: float) -> Any:
    """A dataclass field with a default and range bounds (ge, gt, le, lt)."""
    return field(default=default, metadata=bounds)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast to compute. Not a DVC dependency: it changes speed, not results."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = rng(0, ge=0)  # torch CPU threads; 0 = torch's default
    state_dir: str = "runs"  # run state of fetch-teacher / synth-fae / distill, for resume (README "When things go wrong")
    checkpoint_every: int = rng(1, ge=0)  # save the run state every N epochs; 0 = never (no resume)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: CUDA autocast of the hot loops' forward passes
    # data-parallel processes of fetch-teacher (training), synth-fae and distill on this machine; > 1: the
    # stage starts them itself (torch's elastic launcher, gloo on CPU, NCCL on CUDA); under torchrun the
    # launcher decides and this is ignored (docs/distributed.md)
    nproc: int = rng(1, ge=1)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"runtime.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision == "bf16" and not self.device.startswith(("cuda", "auto")):
            raise ConfigError(f"runtime.precision: bf16 runs only on CUDA (on the CPU it is slower), but runtime.device "
                              f"is {self.device!r}; set runtime.precision: fp32")


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The generated dataset used by tests and quick checks (class-dependent patterns + noise)."""

    num_classes: int = rng(4, ge=2)
    channels: int = rng(1, ge=1)
    image_size: int = rng(16, ge=4)
    train_per_class: int = rng(64, ge=1)
    test_per_class: int = rng(16, ge=1)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and the L-inf threat model's epsilon for it."""

    name: DatasetName = "fashion-mnist"
    root: str = "data/raw"  # inside the repo: `ferd fetch-data` writes the dataset to <root>/<name> (a DVC output)
    source: str = ""  # a folder (or archive) holding the dataset for fetch-data to copy; "" = the usual places
    download: bool = False  # let fetch-data download when no copy is found
    verify_checksums: bool = True  # md5 checks of fetch-data and of CIFAR loading (test fixtures switch them off)
    eps: float = rng(0.1, gt=0.0, le=1.0)  # 0.1 Fashion-MNIST, 8/255 CIFAR/Tiny-ImageNet
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass(frozen=True)
class TeacherTrainConfig:
    """PGD adversarial training (Madry et al.) for ``teacher.source: train``."""

    epochs: int = rng(2, ge=1)
    batch_size: int = rng(128, ge=1)
    lr: float = rng(0.05, gt=0.0)
    momentum: float = rng(0.9, ge=0.0, lt=1.0)
    weight_decay: float = rng(5e-4, ge=0.0)
    attack_steps: int = rng(3, ge=1)
    attack_step_size: float = rng(0.5, gt=0.0)  # PGD step = attack_step_size * eps
    subset: int = rng(0, ge=0)  # train on the first N shuffled images; 0 = the whole split


@dataclass(frozen=True)
class TeacherConfig:
    """Where the robust teacher comes from and how it is built."""

    source: str = "train"  # train | file:PATH | url:URL | robustbench:MODEL_ID
    seed: int = rng(0, ge=0)  # the teacher's own seed, apart from the run seed: seeds of a comparison share one teacher
    sha256: str = ""  # required for url: sources, checked for file: when given
    arch: ArchName = "cnn"
    width: int = rng(16, ge=1)  # width of the small CNN (ignored by the fixed architectures)
    mean: tuple[float, ...] | None = None  # per-channel normalisation inside the model; None = identity
    std: tuple[float, ...] | None = None
    robustbench_dir: str = "data/raw/robustbench"  # RobustBench model_dir (offline: pre-filled)
    download_timeout: float = rng(60.0, gt=0.0)  # seconds, for url: sources
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    eval_subset: int = rng(0, ge=0)  # test images for the closing clean/PGD-20 check; 0 = all
    eval_pgd_steps: int = rng(20, ge=1)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"train|(file|url|robustbench):.+", self.source):
            raise ConfigError(
                f"teacher.source: expected 'train', 'file:PATH', 'url:URL' or 'robustbench:MODEL_ID', got {self.source!r}"
            )
        if self.source.startswith("url:") and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError("teacher.sha256: a url: source needs the file's sha256 (64 lowercase hex digits)")
        if self.sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError(f"teacher.sha256: expected 64 lowercase hex digits, got {self.sha256!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("teacher.mean / teacher.std: give both or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError("teacher.std: every value must be > 0")


@dataclass(frozen=True)
class ProbeConfig:
    """Per-class fragility D_c of the teacher on synthetic data (§2.2): PGD on the frozen teacher."""

    per_class: int = rng(16, ge=1)  # probe images per class, synthesised class-balanced by the FAE synthesiser
    steps: int = rng(20, ge=1)  # PGD-20 as in the paper
    step_size: float = rng(0.25, gt=0.0)  # alpha = step_size * eps (2/255 at 8/255)
    fragility: Literal["all", "agreed"] = "all"  # average -margin over all samples (paper) or only those the teacher labels right
    real_split: Literal["none", "train", "test"] = "train"  # also probe a real labelled split (diagnostic only)
    real_per_class: int = rng(100, ge=1)


@dataclass(frozen=True)
class ReweightConfig:
    """Class proportions p from fragility D (§2.2): softmax(D/tau) (paper), min-max (code), uniform (ablation)."""

    method: Literal["softmax", "minmax", "uniform"] = "softmax"
    signal: Literal["teacher", "student", "oracle"] = "teacher"  # whose fragility drives p (oracle: real images, diagnostic)
    floor: float = rng(0.0, ge=0.0, lt=1.0)  # every class keeps at least floor / C of the pool (0 = no floor)
    tau: float = rng(1.0, gt=0.0)
    min_p: float = rng(0.05, gt=0.0, lt=1.0)  # min-max map bounds (the reference code's 0.05..0.20)
    max_p: float = rng(0.20, gt=0.0, le=1.0)
    momentum: float = rng(0.0, ge=0.0, lt=1.0)  # running average of D across epochs; 0 = use each epoch's D alone

    def __post_init__(self) -> None:
        if self.min_p >= self.max_p:
            raise ConfigError(f"reweight.min_p ({self.min_p}) must be < reweight.max_p ({self.max_p})")


@dataclass(frozen=True)
class FaeConfig:
    """FERD's generator phase (§2.1, §2.3, §2.4): Fairness-Aware Examples appended to the pool each epoch."""

    epochs: int = rng(14, ge=1)  # total synthesis epochs E (warm-up included); the pool ends with E batches
    warmup: int = rng(2, ge=0)  # generator-only epochs before the student trains (paper: 20)
    batch_size: int = rng(128, ge=1)  # B: images synthesised (and kept) per epoch
    steps: int = rng(40, ge=1)  # N_G generator steps per epoch (paper: 200)
    nz: int = rng(100, ge=1)
    ngf: int = rng(64, ge=1)
    lr_g: float = rng(2e-3, gt=0.0)
    lr_z: float = rng(0.015, gt=0.0)
    lambda_bn: float = rng(5.0, ge=0.0)
    lambda_adv: float = rng(1.0, ge=0.0)
    lambda_oh: float = rng(1.0, ge=0.0)
    lambda_uni: float = rng(5.0, ge=0.0)  # 0 switches the FAE uniformity term off (ablation)
    oh_confidence: float = rng(1.0, gt=0.0, le=1.0)  # L_oh stops pulling once p_y >= this (1 = plain CE, the paper)
    ib_steps: int = rng(10, ge=1)  # IB channel-noise fit steps per generator step (paper: 50)
    ib_lr: float = rng(0.1, gt=0.0)
    ib_beta: float = rng(0.3, ge=0.0)
    ib_threshold: Literal["global", "per-sample", "ratio"] = "global"  # the code's batch-wide max, per sample, or sigma^2 > v
    generator: Literal["fresh", "carried"] = "fresh"  # re-initialise G every epoch (paper) or carry it over (fresh z)
    conditional: bool = False  # G(z, y) with a learned class embedding (beyond the paper); paper: G(z)
    lambda_tv: float = rng(0.0, ge=0.0)  # DeepInversion image priors: total variation
    lambda_l2: float = rng(0.0, ge=0.0)  # ... and the squared l2 norm of the centred image
    select: Literal["batch", "image"] = "batch"  # keep the lowest-loss step's batch (paper) or each image's best step
    augment_pad: int = rng(2, ge=0)  # random shift (crop after padding) in pixels; paper: 4 on 32 px
    augment_flip: bool = False  # horizontal flips (paper: on for CIFAR; wrong for Fashion-MNIST)
    # staged schedule only: L_adv needs a student; synth-fae keeps a cheap "shadow" student that
    # mimics the teacher on the pool so far (clean KL, a few SGD steps per epoch). 0 steps = an
    # untrained student, as during the paper's warm-up.
    shadow_arch: ArchName = "cnn"
    shadow_width: int = rng(8, ge=1)
    shadow_steps: int = rng(10, ge=0)
    shadow_lr: float = rng(0.05, gt=0.0)
    shadow_adv_steps: int = rng(0, ge=0)  # > 0: the shadow trains on KL-PGD examples too, like the student

    def __post_init__(self) -> None:
        if self.warmup >= self.epochs:
            raise ConfigError(f"fae.warmup ({self.warmup}) must be < fae.epochs ({self.epochs}): the student needs epochs")


@dataclass(frozen=True)
class UtaeConfig:
    """Uniform-Target Adversarial Examples (§2.5): KL-PGD minus gamma * KL(U || p)."""

    gamma: float = rng(0.3, ge=0.0, le=1.0)  # paper: 0.1-0.5 best; 0 = plain KL-PGD (ablation)
    steps: int = rng(10, ge=1)
    step_size: float = rng(0.25, gt=0.0)  # alpha = step_size * eps
    init_noise: float = rng(0.001, ge=0.0)  # x_U^0 = x_F + init_noise * N(0, I)


@dataclass(frozen=True)
class DistillConfig:
    """Robust distillation of the student (§2.6, §2.7)."""

    schedule: Literal["staged", "interleaved"] = "staged"
    arch: ArchName = "cnn"
    width: int = rng(8, ge=1)
    steps: int = rng(35, ge=1)  # N_S student steps per epoch (paper: 400)
    batch_size: int = rng(128, ge=1)
    lr: float = rng(0.1, gt=0.0)
    momentum: float = rng(0.9, ge=0.0, lt=1.0)
    weight_decay: float = rng(5e-4, ge=0.0)
    loss: Literal["kl", "ikl", "ce_hard"] = "kl"  # KL form (project default), the full IKL/DKL, or DFHL's hard-label CE
    adversary: Literal["utae", "pgd", "hee"] = "utae"  # UTAE (FERD), plain PGD (DFKD baselines), HEE (DFHL); §8
    hee_steps: int = rng(10, ge=1)  # adversary hee (DFHL's high-entropy examples): signed steps of hee_step_size, no eps-ball
    hee_step_size: float = rng(0.03, gt=0.0)
    lambda_clean: float = rng(5 / 6, ge=0.0)
    lambda_adv: float = rng(1 / 6, ge=0.0)
    ikl_temperature: float = rng(100.0, gt=0.0)  # T2 of the IKL weights softmax(t / T2)
    kl_temperature: float = rng(1.0, gt=0.0)  # loss kl: T^2 KL(softmax(t/T) || softmax(s/T)) (Hinton's KD; 1 = RSLAD)
    utae_init: Literal["noise", "cached"] = "noise"  # from FAE + noise (faithful) or from gen-utae's perturbation
    cached_steps: int = rng(3, ge=1)  # UTAE steps when starting from the cached perturbation
    augment_pad: int = rng(2, ge=0)
    augment_flip: bool = False
    mix: Literal["none", "mixup", "cutmix"] = "none"  # mix pool images within a batch; the teacher labels the mixture
    mix_fraction: float = rng(0.5, ge=0.0, le=1.0)  # share of each batch that is mixed (weights ~ U(0, 1))
    # beyond the paper: a third term on examples near a class boundary, by signed ascent from x_F (ferd.adversaries.
    # craft_boundary): hee = the student's entropy (DFHL's HEEs), hee_teacher = the teacher's, disagree = KL(T || S),
    # hee+disagree = hee on the first boundary_hee_share of the rows, disagree on the rest
    boundary: Literal["none", "hee", "hee_teacher", "disagree", "hee+disagree"] = "none"
    lambda_boundary: float = rng(0.5, ge=0.0)  # its weight; x_H is labelled by the teacher on x_H itself
    boundary_fraction: float = rng(0.5, gt=0.0, le=1.0)  # share of each batch that gets an x_H (cost: boundary_steps passes)
    boundary_steps: int = rng(3, ge=1)  # the boundary examples' signed steps (of boundary_step_size x eps)
    boundary_step_size: float = rng(0.3, gt=0.0)  # x eps, like utae.step_size (3 x 0.3 eps: inside the eps-ball)
    boundary_from_epoch: int = rng(1, ge=1)  # first distillation epoch (1-based) with the term; earlier ones are plain
    boundary_hee_share: float = rng(0.5, gt=0.0, lt=1.0)  # hee+disagree: share of the boundary rows that get hee
    # beyond the paper: the saved student is an exponential moving average of the trained one's weights and
    # BatchNorm statistics, updated after every step with this decay (0 = off: the last iterate)
    ema: float = rng(0.0, ge=0.0, lt=1.0)
    # the paper's pool growth: student epoch k trains on the images of synthesis epochs <= warmup + k (true);
    # false (staged schedule only): the whole cached pool from the first student epoch
    pool_growth: bool = True

    def __post_init__(self) -> None:
        if not self.pool_growth and self.schedule == "interleaved":
            raise ConfigError("distill.pool_growth: false trains on the whole cached pool from the start, but the "
                              "interleaved schedule synthesises the pool during distillation; set "
                              "distill.schedule: staged or distill.pool_growth: true")
        if self.utae_init == "cached" and self.adversary != "utae":
            raise ConfigError(f"distill.utae_init: 'cached' starts from gen-utae's UTAEs, which distill.adversary "
                              f"{self.adversary!r} does not use; set distill.utae_init: noise")
        if self.boundary == "hee" and self.adversary == "hee":
            raise ConfigError("distill.boundary: the adversarial term already uses high-entropy examples "
                              "(distill.adversary: hee); set distill.boundary: none")


AutoAttackVersion = Literal["standard", "fast", "off"]


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` stage: attacks at ``data.eps`` on the test split (§5, project default §9 #7).

    ``autoattack: standard`` is the reference AutoAttack (APGD-CE, APGD-T, FAB-T, Square);
    ``fast`` is the cheaper, clearly named APGD-CE + APGD-T subset of the same implementation.
    """

    seed: int = rng(0, ge=0)  # the evaluation's own seed (subsets, random starts): every run is attacked alike
    batch_size: int = rng(256, ge=1)
    per_class: int = rng(0, ge=0)  # class-balanced cap for clean/FGSM/PGD/CW; 0 = full test split
    pgd_steps: int = rng(20, ge=1)
    pgd_step_size: float = rng(0.25, gt=0.0)  # alpha = pgd_step_size * eps
    cw_steps: int = rng(30, ge=1)
    cw_step_size: float = rng(0.25, gt=0.0)
    autoattack: AutoAttackVersion = "standard"
    autoattack_per_class: int = rng(20, ge=1)  # class-balanced AutoAttack subset (it is costly)
    eps_sweep: tuple[float, ...] = (0.5, 1.0, 2.0)  # PGD at these multiples of eps: accuracy must fall

    def __post_init__(self) -> None:
        bad = [m for m in self.eps_sweep if not m > 0]
        if bad:
            raise ConfigError(f"evaluate.eps_sweep: every multiple of data.eps must be > 0, got {bad[0]!r}")


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    seed: int = rng(0, ge=0)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    fae: FaeConfig = field(default_factory=FaeConfig)
    utae: UtaeConfig = field(default_factory=UtaeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------------------------
# generic validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this module


def _check_range(value: Any, bounds: Mapping[str, float], where: str) -> None:
    if value is None or not bounds:
        return
    ops = {"ge": (lambda a, b: a >= b, ">="), "gt": (lambda a, b: a > b, ">"),
           "le": (lambda a, b: a <= b, "<="), "lt": (lambda a, b: a < b, "<")}
    for key, bound in bounds.items():
        check, sign = ops[key]
        if not check(value, bound):
            raise ConfigError(f"{where}: must be {sign} {bound}, got {value!r}")


#: Keys earlier versions read, and why they are gone: an old params.yaml gets this instead of "unknown key".
REMOVED_KEYS = {
    "distill.holdout_per_class": "the distillation holdout is now the probe set (extra synthetic images with teacher "
                                 "labels), never taken out of the pool",
}


def build_section(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from mapping ``raw`` (missing keys take defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if f"{where}.{key}" in REMOVED_KEYS:
            raise ConfigError(f"'{where}.{key}' was removed: {REMOVED_KEYS[f'{where}.{key}']}; delete it from params.yaml")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where}.{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}.{key}'{hint}".replace("'.", "'"))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            sub = f"{where}.{f.name}" if where else f.name
            value = _coerce(hints[f.name], raw[f.name], sub)
            _check_range(value, f.metadata, sub)
            kwargs[f.name] = value
    return cls(**kwargs)


def params_from_mapping(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping."""
    return build_section(Params, raw, "")


def yaml_load(text: str) -> Any:
    """YAML as DVC reads it: PyYAML's safe loader with YAML 1.2 booleans (only true / false).

    DVC reads params.yaml as YAML 1.2 and ``dvc exp run -S`` rewrites it without the quotes YAML
    1.1 needs: ``autoattack: 'off'`` comes back as ``autoattack: off``, which PyYAML's default
    (YAML 1.1) would read as false.
    """
    import yaml

    class Loader(yaml.SafeLoader):  # safe: only the boolean resolver differs
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_set_options(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` command-line overrides as a mapping, each value read as DVC's ``-S`` reads it (:func:`yaml_load`).

    ``flag`` names the option in the one-line error a malformed item gets.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag}: expected KEY=VALUE (e.g. distill.steps=20), got {item!r}")
        out[key.strip()] = yaml_load(value)
    return out


def read_params_mapping(path: str | Path) -> dict[str, Any]:
    """``path``'s YAML as a plain mapping, not yet validated; a one-line ConfigError if it is missing or not YAML."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found; run from the repository root or pass --params PATH")
    try:
        return yaml_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}; fix the syntax") from None


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``teacher.width: 8``) in a params mapping in place, making missing sections; returns it.

    A key that walks through a value that is not a section is a one-line ConfigError.
    """
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
        node[leaf] = value
    return raw


def load_params(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate ``path``; ``overrides`` maps dotted keys to values (``teacher.width: 8``)."""
    return params_from_mapping(apply_overrides(read_params_mapping(path), overrides or {}))


def as_dict(section: Any) -> dict[str, Any]:
    """A section as a plain dict (tuples as lists), for JSON provenance and tables."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(section))
