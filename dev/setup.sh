#!/usr/bin/env bash
# Installs the Debian packages openmoe.c needs, when missing: compilers,
# Debian's python with torch/numpy/sentencepiece/matplotlib (the test
# reference, data prep, plots), OpenBLAS (so that torch's CPU timings are
# fair), the SentencePiece tools, the texts (bible-kjv, fortunes), OpenMPI
# (data-parallel training, test/t_mpi.sh), and clang with its libFuzzer and
# sanitizer runtimes (make fuzz, test/t_fuzz.sh).
set -euo pipefail
pkgs="build-essential python3 python3-torch python3-numpy python3-sentencepiece python3-matplotlib
      libopenblas0-pthread sentencepiece bible-kjv fortunes-min fortunes libopenmpi-dev openmpi-bin
      clang libclang-rt-14-dev"
missing=""
for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q $missing
fi
