"""``benchmarks/gpu.sh`` without a GPU: its arguments, the wheels folder, the plan, the table.

The GPU steps themselves need CUDA; what runs before and after them is checked here: a
wheel is installed (``pip install --dry-run``) from a folder with no index, a folder that
lacks a package is refused, and the table is built from the steps' results and logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu.sh"


def gpu_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable},
    )


@pytest.fixture(scope="module")
def probe_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one wheel built here, of a package nobody has installed."""
    root = tmp_path_factory.mktemp("probe")
    package = root / "src"
    (package / "recaption_wheel_probe").mkdir(parents=True)
    (package / "recaption_wheel_probe" / "__init__.py").write_text("VERSION = '0.1'\n")
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "recaption-wheel-probe"\nversion = "0.1"\n'
    )
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(wheels), str(package)],
        check=True,
        timeout=300,
    )  # fmt: skip
    assert [p.name for p in wheels.iterdir()] == ["recaption_wheel_probe-0.1-py3-none-any.whl"]
    return wheels


def test_help_and_bad_arguments() -> None:
    shown = gpu_sh("--help")
    assert shown.returncode == 0 and "--fetch-wheels DIR" in shown.stdout
    for args, message in [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--budget", "8m"], "--budget must be a whole number"),
        (["--only", "4"], "--only takes steps 1, 2 and 3"),
        (["--concurrency", "1;8"], "--concurrency must look like"),
        (["--dry-run", "--wheels", "/no/such/folder"], "no such folder"),
    ]:
        refused = gpu_sh(*args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)


def test_a_wheel_installs_from_the_folder_without_an_index(probe_wheels: Path) -> None:
    checked = gpu_sh(
        "--dry-run", "--wheels", str(probe_wheels), "--packages", "recaption-wheel-probe"
    )
    assert checked.returncode == 0, checked.stderr
    assert "Would install recaption-wheel-probe-0.1" in checked.stdout + checked.stderr
    assert "1. LLaVA-1.5-7B in-process" in checked.stderr  # the plan follows


def test_a_folder_without_the_packages_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    refused = gpu_sh("--dry-run", "--wheels", str(empty), "--packages", "recaption-wheel-probe")
    assert refused.returncode == 2 and "do not cover the packages" in refused.stderr


def test_the_table_reads_the_steps_results_and_logs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    records = [
        {"measure": "llava-1.5-7b in-process (generate)", "setting": "batch 8",
         "images_per_s": 12.345, "new_tokens_per_s": 790.1, "peak_gib": 15.2, "device": "H200"},
        {"measure": "llava-1.5-7b via transformers serve (stage)", "setting": "concurrency 8",
         "images_per_s": 1.5, "new_tokens_per_s": 96.0, "device": "cuda"},
    ]  # fmt: skip
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "step3.log").write_text(
        "== 3. pipeline latency ==\n"
        "sdxl         1.500 s/image   peak 10.20 GiB\n"
        "koala-700m   0.600 s/image   peak  6.10 GiB\n"
        "koala-700m/sdxl: 0.40 here   vs 0.40 card (4090)\n"
    )
    shown = gpu_sh("--report", "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any("batch 8" in line and "12.35" in line and "15.2" in line for line in lines)
    assert any("concurrency 8" in line and "1.50" in line for line in lines)
    assert any(line.startswith("pipeline 1024px") and "1.500" in line for line in lines)
    assert any("koala-700m/sdxl" in line and "0.40 here" in line for line in lines)


def test_without_cuda_it_stops_before_any_step(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the benchmarks")
    stopped = gpu_sh("--out", str(tmp_path / "out"), "--only", "1")
    assert stopped.returncode == 2 and "torch sees no CUDA device here" in stopped.stderr
    assert not (tmp_path / "out").exists()
