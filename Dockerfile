# GPU image for running raysim on a Ray / KubeRay cluster: CUDA build of torch, then this
# project, run as the non-root user `ray` (uid 1000, the uid the k8s/ manifests expect).
#
#   docker build -t REGISTRY/raysim:0.1.0-ray2.60.0 .     # tag: <raysim version>-ray<Ray version>
#
# The install steps are the Makefile's (what CI runs: upgrade pip, then
# `pip install -c constraints.txt .`), except that torch is first installed from PyTorch's
# CUDA wheel index. Its version (e.g. 2.13.0+cu128) satisfies the `torch==2.13.0` pin in
# constraints.txt, so the project install keeps that CUDA build instead of replacing it.
# The torch wheels bring their own CUDA libraries; the node only needs the NVIDIA driver
# and device plugin. Keep CUDA_IMAGE and TORCH_INDEX_URL on the same CUDA major version.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# bash runs the `ray start` command KubeRay generates; wget serves the health probes of
# KubeRay versions that use it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Ubuntu images ship a user `ubuntu` with uid 1000; the manifests' uid belongs to `ray`.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid 1000 --user-group --create-home --shell /bin/bash ray

# The venv stays root-owned: the running user can use it but not change it.
RUN python3 -m venv /opt/venv \
 && pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/raysim
COPY pyproject.toml constraints.txt README.md ./
COPY raysim raysim
COPY actors actors
COPY models models
COPY configs configs
RUN pip install -c constraints.txt . \
 && python -c "import torch, ray, raysim; print('torch', torch.__version__, 'ray', ray.__version__)"

USER 1000:1000
WORKDIR /home/ray
ENV RAYSIM_CACHE=/home/ray/.cache/raysim
CMD ["bash"]
