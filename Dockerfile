# One image for every gmv part; docker-compose.yml picks the command (docs/deploy.md).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gmv gmv
COPY ticker ticker
COPY simulator simulator
COPY web web
COPY data data
RUN pip install --no-cache-dir -e . && python -m compileall -q gmv ticker simulator
# The health check docker-compose.yml runs in every gmv container (standard library only).
COPY deploy/healthcheck.py deploy/healthcheck.py
# An unprivileged user. /data, where the shards keep their checkpoints, is its own; a new
# named volume mounted there takes that owner.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin gmv \
    && mkdir -p /data && chown gmv:gmv /data
USER gmv
ENV GMV_STATE_DIR=/data
ENTRYPOINT ["gmv"]
