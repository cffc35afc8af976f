"""Fixtures for the foundation tests: demo configs written to temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def write_config(path: Path, run_dir: Path, **sections: dict) -> Path:
    """The demo config with ``run_dir`` and some section values replaced."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["run_dir"] = str(run_dir)
    for name, values in sections.items():
        data.setdefault(name, {})
        data[name].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


# A small world in which every row passes the pre-filter, so every bad URL is attempted.
SMALL_WORLD = {"n_images": 60, "seed": 3}
LENIENT_DOWNLOAD = {
    "min_aesthetic_score": None,
    "max_punsafe": None,
    "max_pwatermark": None,
    "samples_per_shard": 20,
    "processes": 1,
    "threads": 8,
    "timeout": 3,
}


@pytest.fixture
def make_config():
    """``make_config(path, run_dir, **sections)``: write a demo config with some values changed."""
    return write_config


@pytest.fixture
def lenient_download() -> dict:
    """Download settings under which every row of the demo world is attempted."""
    return dict(LENIENT_DOWNLOAD)


@pytest.fixture
def small_config(tmp_path: Path) -> Path:
    """A demo config over a 60-image world with a lenient pre-filter."""
    return write_config(
        tmp_path / "run.yaml", tmp_path / "run", demo=SMALL_WORLD, download=LENIENT_DOWNLOAD
    )
