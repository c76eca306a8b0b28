# The ToolServer node image: one sandboxed tool server per agent session.
#
# Build context: a directory holding wheels only (no network is used inside the build):
#   deps/  every dependency of toolserver as a wheel   (pip wheel . -w deps; toolserver's own removed)
#   app/   toolserver's own wheel                        (pip wheel --no-deps . -w app)
# scripts/build-node-image.sh prepares that context (build/wheels) and runs the build; on machines
# that cannot pull the base image it first makes one from Debian packages (toolserver-base:bookworm).
#
# Any base with python3 (3.11, the version the wheels were built for), python3 -m venv, bash,
# groupadd/useradd works.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- stage 1: a virtualenv holding the dependencies (cached while pyproject.toml is unchanged)
FROM ${BASE_IMAGE} AS deps
COPY deps/ /tmp/wheels/
RUN python3 -m venv /opt/toolserver \
    && /opt/toolserver/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheels /tmp/wheels/*.whl
ARG DEPS_HASH=unknown
LABEL toolserver.stage=deps toolserver.deps-hash=${DEPS_HASH}

# --- stage 2: the node image (no wheel files left behind)
FROM ${BASE_IMAGE}
ARG TOOLSERVER_UID=10001
ENV PATH=/opt/toolserver/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/toolserver \
    TOOLSERVER_NODE_STATE_DIR=/home/toolserver/state

# A fixed, non-root uid/gid: the runtime runs the node as ${TOOLSERVER_UID}:${TOOLSERVER_UID}.
# No setuid or setgid program is left in the image (su, mount, passwd...): nothing for a node to
# raise its privileges with, even where no_new_privs were off.
RUN find / -xdev -type f -perm /6000 -exec chmod ug-s {} + \
    && groupadd --system --gid "${TOOLSERVER_UID}" toolserver \
    && useradd --system --uid "${TOOLSERVER_UID}" --gid toolserver --home-dir /home/toolserver \
        --create-home --shell /bin/bash toolserver \
    && mkdir -p /workspace /home/toolserver/state \
    && chown toolserver:toolserver /workspace /home/toolserver/state \
    && chmod 0750 /workspace /home/toolserver/state

COPY --from=deps /opt/toolserver /opt/toolserver
COPY app/ /tmp/app/
RUN /opt/toolserver/bin/pip install --no-index --no-deps --no-cache-dir /tmp/app/*.whl \
    && rm -rf /tmp/app \
    && toolserver --version

USER ${TOOLSERVER_UID}:${TOOLSERVER_UID}
# matplotlib's font list, built once here rather than on every node's first plot (~1 s); the
# notebook kernel and scripts use this directory (a read-only root filesystem makes matplotlib
# fall back to a temporary one, at that cost)
ENV MPLCONFIGDIR=/home/toolserver/.config/matplotlib
RUN python3 -c "import matplotlib.font_manager" && ls "$MPLCONFIGDIR"/fontlist-*.json >/dev/null
WORKDIR /workspace
# No VOLUME: the runtime mounts a named volume at /workspace (an anonymous one would leak).
EXPOSE 31942

# Health: Docker 20.10 has no --start-interval, so the first probe runs one interval after the
# start and the interval bounds how soon Docker says "healthy". But every probe is a `docker exec`
# (measured here: 0.2-0.3 CPU-seconds in the Engine, runc and the probe), so 20 idle nodes probed
# every 2 s keep 2 cores busy. Hence Docker's default interval of 30 s (a hung node is unhealthy
# after ~90 s), while fast readiness comes from the runtime, which asks GET /health itself (one
# HTTP request, no exec) while Docker still says "starting". /health needs no secret.
# node.creation_kwargs.healthcheck overrides all of it.
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-I", "-S", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:31942/health', timeout=2)"]

# setpriv: the node and everything it starts can never gain privileges (a setuid binary keeps the
# caller's uid), whichever runtime starts the container; Docker's no-new-privileges does the same
# for the Docker tier, but a Swarm service (Engine API 1.41) cannot ask for it.
ENTRYPOINT ["setpriv", "--no-new-privs", "--", "toolserver", "node", "--host", "0.0.0.0", "--port", "31942", "--workspace", "/workspace"]
