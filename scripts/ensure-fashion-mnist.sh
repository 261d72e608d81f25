#!/usr/bin/env bash
# Make sure Debian's Fashion-MNIST (package dataset-fashion-mnist) is installed: `ferd fetch-data`,
# the pipeline's first stage, copies it into data/raw/fashion-mnist (a DVC output). Installs the
# package with apt-get when it is missing and we may; otherwise says what else fetch-data accepts.
set -euo pipefail
out="${1:-data/raw/fashion-mnist}"   # fetch-data's output folder
debian=/usr/share/datasets/fashion-mnist
files="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
have() { for f in $files; do [ -s "$1/$f.gz" ] || [ -s "$1/$f" ] || return 1; done; }
if have "$debian"; then echo "Fashion-MNIST: Debian's copy in $debian (ferd fetch-data copies it)"; exit 0; fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || true
elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist (sudo)"
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || true
fi
if have "$debian"; then echo "Fashion-MNIST: Debian's copy in $debian (ferd fetch-data copies it)"; exit 0; fi
# Files put into the output folder by hand (how it was done before fetch-data) would be deleted by
# `dvc repro` before fetch-data runs: stop before that happens.
if have "$out" && [ ! -f "$out/fetched.json" ]; then
  echo "error: $out holds Fashion-MNIST files put there by hand, but that folder is the output of the fetch-data stage and dvc repro would delete it; move them to another folder and set data.source: /absolute/path/of/it in params.yaml" >&2
  exit 1
fi
echo "Fashion-MNIST: Debian's dataset-fashion-mnist is not installed; for Fashion-MNIST, ferd fetch-data then needs data.source: /absolute/folder or data.download: true in params.yaml"
