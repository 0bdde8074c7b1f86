# syntax=docker/dockerfile:1
# Motorcade: one image for every role.
#   docker build -t motorcade:0.1.0 .
#   docker run --rm --env-file .env motorcade:0.1.0 migrate   # or api | ingest | worker
# Built from the lock (constraints.txt), without the dev extras; runs as an unprivileged user;
# holds no secret (configuration comes from MOTORCADE_* variables at run time: docs/configuration.md).
# Pin the base by digest in your registry mirror for byte-for-byte rebuilds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/motorcade
WORKDIR /src
# The lock first, so the dependency layer is reused while only the code changes.
COPY pyproject.toml constraints.txt README.md ./
COPY core ./core
COPY models ./models
COPY services ./services
COPY workflows ./workflows
COPY activities ./activities
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
# devtools/ (local servers, `motorcade dev`, `simulate`, the generated documents) ships too, so
# those subcommands work in a container as in a checkout; the roles never import it.
COPY devtools ./devtools
# Not editable, no [dev] extras: the packages (and migrations/, alembic.ini included) land in
# the venv's site-packages; nothing in the runtime stage refers to /src.
RUN /opt/motorcade/bin/pip install -c constraints.txt . \
 && /opt/motorcade/bin/python -c "import core.cli, api.app, worker.main, devtools.devstack; \
import importlib.resources as r; m = r.files('migrations'); \
assert m.joinpath('alembic.ini').is_file() and m.joinpath('script.py.mako').is_file(); \
assert any(p.name.endswith('.py') for p in m.joinpath('versions').iterdir())"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="motorcade" \
      org.opencontainers.image.description="Safe software rollouts to vehicle fleets (Temporal, FastAPI, PostgreSQL)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 motorcade \
 && useradd --system --uid 10001 --gid motorcade --home-dir /home/motorcade --create-home \
      --shell /usr/sbin/nologin motorcade
COPY --from=build /opt/motorcade /opt/motorcade
ENV PATH=/opt/motorcade/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MOTORCADE_ENV=production \
    MOTORCADE_LOG_FORMAT=json \
    MOTORCADE_API_HOST=0.0.0.0 \
    MOTORCADE_STATE_DIR=/home/motorcade/.motorcade
USER 10001:10001
WORKDIR /home/motorcade
# api: 8000 (MOTORCADE_API_PORT); ingest: 8001 (the API port + 1).
EXPOSE 8000 8001
# Checks the role this container runs (PID 1's arguments): api and ingest answer /readyz,
# a worker has a live poller on its task queue; one-shot commands (migrate) always pass.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python", "-m", "core.healthcheck"]
ENTRYPOINT ["motorcade"]
CMD ["api"]
