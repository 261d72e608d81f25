"""Cost of the model digest (issue 12) at paper scale: a WRN-34-10 (about 46 M parameters, 185 MB).

    python benchmarks/bench_digest.py [--arch wrn34_10] [--repeats 3] [--dir /tmp]

Writes the model once with ``ferd.artifacts.save_model`` and prints, best of ``--repeats``:
- write: ``save_model`` (serialise + digest + atomic write + fsync) and the digest alone;
- load: ``load_model`` (header checks, safetensors load, digest check, network built and filled)
  against the same steps without the digest check (``load_file``, ``build_model``,
  ``load_state_dict``), and ``load_file`` alone (it maps the file: the bytes are read later, when
  the weights are copied into the network, or when the digest reads them).
The difference verified - unverified load is the price of the check. The file is read from the
page cache after the first repeat, which is what a stage loading the teacher normally sees.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ferd.artifacts import load_model, load_model_state, model_meta, save_model, tensors_digest
from ferd.models import build_model


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="wrn34_10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temporary folder)")
    args = ap.parse_args()

    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=10, in_channels=3, image_size=32)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state.values() if v.is_floating_point())
    meta = model_meta(arch=args.arch, num_classes=10, input_shape=(3, 32, 32), mean=[0.0] * 3, std=[1.0] * 3,
                      dataset="cifar10", source="bench")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.safetensors"
        write = best(lambda: save_model(path, state, meta), args.repeats)
        size = path.stat().st_size
        loaded, _ = load_model_state(path)
        digest = best(lambda: tensors_digest("{}", loaded), args.repeats)
        mapped = best(lambda: load_file(str(path)), args.repeats)

        def unverified() -> None:
            net = build_model(args.arch, num_classes=10, in_channels=3, image_size=32)
            net.load_state_dict(load_file(str(path)))

        plain = best(unverified, args.repeats)
        verified = best(lambda: load_model(path), args.repeats)
    print(f"{args.arch}: {params / 1e6:.1f} M parameters, {size / 1e6:.0f} MB file; best of {args.repeats}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  digest alone (sha256)            {digest:7.3f} s  ({size / 1e6 / digest:.0f} MB/s)")
    print(f"  write: save_model                {write:7.3f} s  (digest = {digest / write:.0%} of it)")
    print(f"  load: load_file alone (mapped)   {mapped:7.3f} s")
    print(f"  load: load_file + build + fill   {plain:7.3f} s  (no verification)")
    print(f"  load: load_model                 {verified:7.3f} s  (verified: {verified / plain:.2f}x, "
          f"+{verified - plain:.3f} s)")


if __name__ == "__main__":
    main()
