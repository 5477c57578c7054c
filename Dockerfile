# zimage-server in one image: the API process and its worker processes (one per visible GPU).
# deploy/README.md explains every argument, volume and variable; in short:
#
#   docker build -t zimage-server .                        # CUDA PyTorch from PyPI (several GB)
#   docker build -t zimage-server:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker build -t zimage-server:ray --build-arg EXTRAS=ray .     # for KubeRay
#   docker run --gpus all -p 8000:8000 -v zimage-cache:/cache -v zimage-data:/data zimage-server
#
# podman keeps HEALTHCHECK only in Docker's image format: `podman build --format docker`.

# Any Debian bookworm root filesystem: CI builds one with debootstrap (scripts/build-base-image).
ARG BASE_IMAGE=debian:bookworm-slim

# Debian's Python 3.11, shared by every stage so the virtual environment built in one runs
# in the other (its interpreter is /usr/bin/python3 in both).
FROM ${BASE_IMAGE} AS python
# Debian's stable packages take security fixes under new version numbers: pin the release
# (bookworm, Python 3.11), not each package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# The virtual environment with every dependency, but not this project.
FROM python AS deps
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/zimage/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/zimage
# pip's own settings pass through as build arguments (a mirror, a folder of wheels, the CA
# of a TLS-inspecting proxy); they stay in this stage and never reach the final image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
# PyTorch first, in its own layer: the largest download, and the one that changes least.
# Empty TORCH_INDEX_URL: pip's index (PyPI: the CUDA build); the CPU-only variant is
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# (pinned, through TORCH_VERSION: hadolint cannot see it)
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
# Then the dependencies, from pyproject.toml alone, so editing the source reuses this layer.
# EXTRAS: comma-separated optional dependencies (ray, fp8).
ARG EXTRAS=""
COPY pyproject.toml /src/
RUN python -c 'import os, tomllib; \
project = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
extras = [name.strip() for name in os.environ["EXTRAS"].split(",") if name.strip()]; \
print("\n".join(project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]))' \
    >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# This project as a wheel: the only layers a source change rebuilds.
FROM deps AS wheel
# (build arguments are per stage: pip's again, for setuptools)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
COPY README.md /src/
COPY src /src/src
RUN pip wheel --no-deps --wheel-dir /wheels /src

FROM python AS runtime
ARG EXTRAS=""
# KubeRay's default probes call wget inside Ray's containers.
# hadolint ignore=DL3008
RUN case ",${EXTRAS}," in *,ray,*) \
        apt-get update && apt-get install -y --no-install-recommends wget \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac
# A fixed, non-root uid (Kubernetes' runAsNonRoot checks the number); the volumes' folders
# belong to it, so fresh named volumes do too.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/zimage \
        --shell /usr/sbin/nologin zimage \
    && mkdir -p /data /cache \
    && chown zimage:zimage /data /cache
COPY --from=deps /opt/zimage /opt/zimage
COPY --from=wheel /wheels /tmp/wheels
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    /opt/zimage/bin/pip install --no-deps --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && /opt/zimage/bin/zimage --help >/dev/null
# Login shells (KubeRay starts Ray with `bash -lc`) get PATH from /etc/profile, which drops
# ENV PATH: put the environment back there ($PATH expands at login, not here).
# hadolint ignore=SC2016
RUN echo 'PATH=/opt/zimage/bin:$PATH' >/etc/profile.d/zimage.sh
ENV PATH=/opt/zimage/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ZIMAGE_HOST=0.0.0.0 \
    ZIMAGE_PORT=8000 \
    ZIMAGE_DATA_DIR=/data \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton
# /data: outputs, the SQLite store (unless ZIMAGE_DATABASE_URL), the tiny model.
# /cache: Hugging Face weights (`hf download` into it once) and compiled kernels.
VOLUME ["/data", "/cache"]
USER 10001:10001
WORKDIR /home/zimage
EXPOSE 8000
# Healthy once the model is loaded and warmed up (/readyz 200); loading the real weights and
# compiling can take minutes on first start, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('ZIMAGE_PORT', '8000'), timeout=4)"]
# tini forwards SIGTERM (the server drains, then exits) and reaps the worker processes.
ENTRYPOINT ["tini", "--", "zimage"]
CMD ["serve"]
