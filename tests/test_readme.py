"""Every ``python`` block of README.md runs as written, each in a fresh interpreter."""

import os
import pathlib
import re
import subprocess
import sys

import pytest


README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{index}" for index in range(len(BLOCKS))])
def test_readme_example_runs(code: str, tmp_path: pathlib.Path) -> None:
    # A block that starts with "# test_*.py" is a pytest file (run by pytest with the db_retry plugin);
    # any other block is a script.
    pytest_file = re.match(r"# (test_\w+\.py)\n", code)
    script = tmp_path / (pytest_file[1] if pytest_file else "example.py")
    script.write_text(code)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DB_RETRY_")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)] if pytest_file else []
    completed = subprocess.run(  # noqa: S603 - our own interpreter on our own README
        command or [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    if not pytest_file:  # a script says in one line what it showed
        assert len(completed.stdout.splitlines()) == 1, completed.stdout
