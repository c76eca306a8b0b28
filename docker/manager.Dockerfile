# The ToolServer manager image, for deployments where the manager runs in a container next to its
# nodes (docker-compose.yml): isolation docker, runtime_config.address_mode network.
#
# Same build context as docker/node.Dockerfile (build/wheels: deps/ and app/, made by
# scripts/build-node-image.sh); its first stage is the same as the node's, so Docker reuses it.
# No network is used inside the build. deps/ includes asyncpg, so a postgresql+asyncpg:// database_url
# works as well as the default SQLite file in the volume.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS deps
COPY deps/ /tmp/wheels/
RUN python3 -m venv /opt/toolserver \
    && /opt/toolserver/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheels /tmp/wheels/*.whl
ARG DEPS_HASH=unknown
LABEL toolserver.stage=deps toolserver.deps-hash=${DEPS_HASH}

FROM ${BASE_IMAGE}
ENV PATH=/opt/toolserver/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOOLSERVER_ISOLATION=docker \
    TOOLSERVER_HOST=0.0.0.0 \
    TOOLSERVER_PORT=8080 \
    TOOLSERVER_DATA_DIR=/data \
    TOOLSERVER_DATABASE_URL=sqlite+aiosqlite:////data/toolserver.db

COPY --from=deps /opt/toolserver /opt/toolserver
COPY app/ /tmp/app/
RUN /opt/toolserver/bin/pip install --no-index --no-deps --no-cache-dir /tmp/app/*.whl \
    && rm -rf /tmp/app \
    && mkdir -p /data \
    && toolserver --version

# The manager talks to the Docker socket, which is root on the host whatever the uid in here;
# it runs as root without capabilities (compose drops them all) so that it can open the socket
# (owned by root) on any host without knowing the host's docker group id.
WORKDIR /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-I", "-S", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8080/alive', timeout=2)"]

ENTRYPOINT ["toolserver", "manager"]
