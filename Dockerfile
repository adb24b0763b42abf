# One image for all four huiying services and for the one-shot `migrate` job (docker-compose.yml).
#
#   docker build -t huiying:local .
#   docker run --rm huiying:local                     # prints the runner's usage
#   docker run --rm ... huiying:local python -m services.common.runner intake
#
# Two stages: durable-rules 2.0.28 is published only as an sdist with a C extension, so the
# dependencies are compiled in a stage that has gcc and the finished virtualenv is copied into a
# clean python:3.11-slim. (psycopg2-binary ships wheels, so no libpq headers are needed.)

FROM python:3.11-slim AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

WORKDIR /app
# README* rather than README.md: pyproject names it, but a checkout without one must still build
# (setuptools only warns). A wildcard that matches nothing is fine next to a file that exists.
COPY pyproject.toml README* ./
COPY services ./services
COPY huiying ./huiying
# Build isolation fetches setuptools<81 as pyproject.toml's build-system asks.
RUN pip install --no-cache-dir .


FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HUIYING_RULES_DIR=/app/rules \
    HUIYING_VAR_DIR=/app/var

RUN groupadd --system --gid 10001 huiying \
    && useradd --system --uid 10001 --gid huiying --home-dir /app --no-create-home --no-log-init huiying

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# The allow-listed context (.dockerignore): pyproject.toml, README.md, services, huiying, rules,
# data. Copied as a whole so that a checkout without rules/ (git keeps no empty directories) or
# without README.md still builds. `python -m services.common.runner` runs from /app, so
# PROJECT_ROOT (services/common/config.py) is /app, as in a checkout.
COPY . .
# The last two commands fail the build, not the first container start, if the compiled rules
# engine, the PostgreSQL driver, China's time zone or the CLI entry point is missing.
RUN mkdir -p rules data var \
    && chown huiying:huiying var \
    && python -c "import durable.lang, psycopg2; from zoneinfo import ZoneInfo; ZoneInfo('Asia/Shanghai')" \
    && huiying --help > /dev/null

USER huiying

# HTTP of intake, routing, supervision, notify (each needs HUIYING_<SERVICE>_ADDRESS=0.0.0.0:800N).
EXPOSE 8001 8002 8003 8004

# No default service: run `python -m services.common.runner {intake,routing,supervision,notify}`
# or `huiying migrate`. Without arguments the runner prints its usage (and exits 2).
CMD ["python", "-m", "services.common.runner"]
