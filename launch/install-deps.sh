#!/usr/bin/env bash
# Installs SwiftMoE's system dependencies (Debian/Ubuntu): OpenMPI, OpenBLAS and oneDNN.
# Swift itself (6.x) must already be on PATH. Skips apt when everything is present.
set -euo pipefail
packages=(libopenmpi-dev openmpi-bin libopenblas-dev libdnnl-dev pkg-config iproute2 util-linux)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "error: swift is not on PATH; install Swift 6 from swift.org" >&2; exit 1; }
