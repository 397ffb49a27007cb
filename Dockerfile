# One image for every part; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gmv gmv
COPY ticker ticker
COPY simulator simulator
COPY web web
COPY data data
RUN pip install --no-cache-dir -e .
ENTRYPOINT ["gmv"]
