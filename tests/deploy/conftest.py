"""Each values file of tests/deploy rendered once per session, shared by the chart tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.chart_rig import CASES, Manifest, parse_manifests, template

Rendered = dict[str, tuple[Path, list[Manifest]]]


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """Each case's output file and its manifests."""
    home = tmp_path_factory.mktemp("helm")
    out: Rendered = {}
    for name, values in CASES.items():
        proc = template(home, values)
        assert proc.returncode == 0, proc.stderr
        path = home / (name.replace("/", "_") + ".yaml")
        path.write_text(proc.stdout)
        out[name] = (path, parse_manifests(proc.stdout))
    return out
