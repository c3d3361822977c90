#!/usr/bin/env bash
# Installs nvcc and the static CUDA runtime into a manylinux_2_28 image (AlmaLinux 8) from
# NVIDIA's RHEL 8 package repository; cibuildwheel runs it once per image (pyproject.toml,
# before-all). Only the compiler and libcudart_static.a: the wheel needs no other CUDA library,
# and no driver (libcuda is loaded at run time, on the user's machine).
#
#   CUDA_VERSION=13.0 bash scripts/install_cuda.sh      (13.0 is the default)
set -euo pipefail
CUDA_VERSION="${CUDA_VERSION:-13.0}"
case "$(uname -m)" in
  x86_64) repo=x86_64 ;;
  aarch64) repo=sbsa ;;   # Arm servers (Grace, Graviton): NVIDIA's "server base system arch"
  *) echo "install_cuda.sh: NVIDIA publishes no CUDA toolkit for $(uname -m)" >&2; exit 1 ;;
esac
dnf install -y dnf-plugins-core
dnf config-manager --add-repo \
  "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${repo}/cuda-rhel8.repo"
pkg_version="${CUDA_VERSION/./-}"
dnf install -y --setopt=install_weak_deps=False \
  "cuda-nvcc-${pkg_version}" "cuda-cudart-devel-${pkg_version}"
[ -e /usr/local/cuda ] || ln -s "/usr/local/cuda-${CUDA_VERSION}" /usr/local/cuda
test -f /usr/local/cuda/lib64/libcudart_static.a
/usr/local/cuda/bin/nvcc --version
