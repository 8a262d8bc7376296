# The package with its development tools, and the PostgreSQL server binaries the test kit and
# `db-retry demo` start throwaway clusters from. docker-compose.yml runs the test suite in it against
# its own primary (DB_RETRY_TEST_DSN), after checking the primary and the streaming replica (DB_DSN).
FROM python:3.11-slim-bookworm

# Server binaries only: the kit makes its own clusters, so no default cluster is created. The package
# also creates the unprivileged `postgres` account the kit hands servers to when it runs as root.
# iptables: the kit's network partition (faults.partition), run as root; docker-compose.yml gives the
# app NET_ADMIN for it.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/no-main-cluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql iptables \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# The package (pyproject.toml, README.md as its long description, db_retry/) is installed before the
# rest is copied: editing those reinstalls it; editing tests, benchmarks or architecture notes does not.
COPY pyproject.toml README.md ./
COPY db_retry ./db_retry
RUN pip install -e '.[dev]'
COPY . .

CMD ["db-retry", "--help"]
