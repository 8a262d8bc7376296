# Development commands. Tools come from the active virtualenv, else from ./.venv (made by `just install`).

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := env("VIRTUAL_ENV", justfile_directory() / ".venv")
bin := venv / "bin"
lowest := justfile_directory() / ".venv-lowest"

# List the recipes.
default:
    @just --list

# Create the virtualenv if missing and install the package with its development tools.
install:
    test -x "{{ bin }}/python" || python3 -m venv "{{ venv }}"
    "{{ bin }}/python" -m pip install -q -e '.[dev]'

# Lint, check formatting and type-check.
lint:
    "{{ bin }}/ruff" check .
    "{{ bin }}/ruff" format --check .
    "{{ bin }}/mypy"

# Lint, then run the suite against real PostgreSQL servers with the 100% coverage gate (pyproject: fail_under).
test: lint
    "{{ bin }}/pytest" --cov --cov-report=term-missing

# Run the suite against the lowest supported runtime dependencies: the lower bounds in pyproject.toml, pinned.
# The whole suite, topology proofs (Patroni, HAProxy, PgBouncer) included: the library holds there too.
test-lowest:
    rm -rf "{{ lowest }}"
    python3 -m venv "{{ lowest }}"
    @"{{ lowest }}/bin/python" -c {{ quote(pins) }} pyproject.toml > "{{ lowest }}/constraints.txt"
    @echo "lowest supported versions:" && cat "{{ lowest }}/constraints.txt"
    "{{ lowest }}/bin/python" -m pip install -q -c "{{ lowest }}/constraints.txt" -e '.[dev]'
    "{{ lowest }}/bin/pytest" -q

# Generated fault schedules with many random examples instead of the fixed ones (tests/test_fault_schedules.py).
soak examples="1000":
    DB_RETRY_SOAK_EXAMPLES={{ examples }} "{{ bin }}/pytest" -q -p no:cacheprovider tests/test_fault_schedules.py -k generated

# Compare this package with db-retry 0.8.4 from PyPI, side by side.
bench:
    "{{ bin }}/python" benchmarks/run.py

# Liveness benchmark (benchmarks/README.md): detection time per silent fault, cost of deadline=, happy path; root.
bench-liveness *args:
    "{{ bin }}/python" benchmarks/liveness.py {{ args }}

# Start a throwaway cluster and run the main job against it while injecting faults.
demo:
    "{{ bin }}/db-retry" demo

# `name>=X` -> `name==X` for every runtime dependency of the pyproject.toml given as argument.
pins := '''
import re, sys, tomllib
with open(sys.argv[1], "rb") as file:
    dependencies = tomllib.load(file)["project"]["dependencies"]
for requirement in dependencies:
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*[^;]*?>=\s*([^,;\s]+)", requirement)
    if match is None:
        sys.exit(f"no lower bound in {requirement!r}: every runtime dependency needs one")
    print(f"{match[1]}=={match[2]}")
'''
