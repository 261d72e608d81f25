#!/usr/bin/env bash
# Make sure Fashion-MNIST's four IDX files are in data/raw/fashion-mnist (the default dataset).
# Source, in order: already there; Debian's package dataset-fashion-mnist (installed with apt-get
# when it is missing and we may); otherwise explain what to do.
set -euo pipefail
dest="${1:-data/raw/fashion-mnist}"
debian=/usr/share/datasets/fashion-mnist
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have() { for f in $files; do [ -s "$1/$f" ] || return 1; done; }
if have "$dest"; then echo "Fashion-MNIST: present in $dest"; exit 0; fi
if ! have "$debian"; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
    echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist (sudo)"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  fi
fi
if ! have "$debian"; then
  echo "error: Fashion-MNIST not found: put the four IDX .gz files in $dest, install Debian's dataset-fashion-mnist, or set data.download: true in params.yaml" >&2
  exit 1
fi
mkdir -p "$dest"
for f in $files; do cp "$debian/$f" "$dest/$f"; done
echo "Fashion-MNIST: copied from $debian to $dest"
