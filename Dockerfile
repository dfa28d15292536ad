# cryptopi appliance image: the lean runtime set from uv.lock (no TensorFlow, pandas or scikit-learn),
# the package with its baked-in model registry, run as a non-root user with its database on /data.
#
# Builds with the classic builder (DOCKER_BUILDKIT=0) as well as with BuildKit/buildx for linux/amd64 and
# linux/arm64, so no BuildKit-only syntax here. BASE is any Debian-like Python 3.11 with `python3 -m venv`:
# python:3.11-slim (the default), or a debootstrap image with python3 + python3-venv (the offline tests).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build

# uv itself, pinned, in a throw-away venv (a Debian base refuses a system-wide pip install).
ARG UV_VERSION=0.13.9
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"

# Trust the system certificate store (a TLS-inspecting proxy's CA lives there), never fetch an interpreter,
# install into the venv the runtime stage copies, byte-compiled (the non-root user cannot write __pycache__).
ENV UV_SYSTEM_CERTS=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

WORKDIR /src
RUN python3 -m venv --without-pip /opt/venv

# The dependencies first, exactly as locked: no extras (training, webhook, dev), so this layer is reused
# until uv.lock changes. Then what inference never loads goes: the test suites, numpy's f2py, distutils and
# C headers, onnxruntime's offline tooling (quantization, transformer optimizers, model tools) and its C-API
# library (libonnxruntime.so: the Python binding has the runtime built in and does not load it), and pip
# (a dependency of sqlite-utils for its `install` command only; `export` and the store's CLI never use it).
COPY pyproject.toml uv.lock ./
RUN /opt/uv/bin/uv sync --locked --no-dev --no-install-project --python /opt/venv/bin/python \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && rm -rf "$site"/numpy/tests "$site"/numpy/*/tests "$site"/numpy/*/*/tests "$site"/numpy/f2py \
        "$site"/numpy/distutils "$site"/numpy/_core/include "$site"/numpy/_pyinstaller \
        "$site"/onnxruntime/quantization "$site"/onnxruntime/transformers "$site"/onnxruntime/tools \
        "$site"/onnxruntime/capi/libonnxruntime.so.* \
        "$site"/pip /opt/venv/bin/pip /opt/venv/bin/pip3 /opt/venv/bin/pip3.*

# Then the project itself, as a regular (non-editable) install: appliance/ with its model registry.
# (No onnxruntime import here: since 1.28 it crashes under qemu-user 7.2, whose /proc/cpuinfo is the
# x86 host's, so an emulated arm64 build could not run it; tests/test_image.py runs the image instead.)
COPY README.md ./
COPY appliance ./appliance
RUN /opt/uv/bin/uv sync --locked --no-dev --no-editable --python /opt/venv/bin/python \
    && /opt/venv/bin/python -m appliance --help > /dev/null


FROM ${BASE}

RUN useradd --no-log-init --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin cryptopi \
    && mkdir -p /data \
    && chown cryptopi:cryptopi /data

COPY --from=build /opt/venv /opt/venv

# (onnxruntime's usage telemetry is switched off by the appliance package itself, for every way it runs.)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRYPTOPI_DATA_DIR=/data \
    CRYPTOPI_HTTP_PORT=8000

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "appliance", "healthcheck"]

ENTRYPOINT ["/opt/venv/bin/python", "-m", "appliance"]
CMD ["up"]

# Last, so that a new build id only changes metadata, never a filesystem layer.
ARG BUILD=dev
ENV CRYPTOPI_BUILD=${BUILD}
LABEL org.opencontainers.image.title="cryptopi" \
      org.opencontainers.image.description="Raspberry Pi appliance: live Coinbase trades into SQLite, next-hour BTC/ETH predictions served on the device" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${BUILD}"
