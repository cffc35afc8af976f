"""The ``openai`` caption backend against a real ``transformers serve`` on 127.0.0.1.

``transformers serve`` (the ``serve`` extra) runs the demo's tiny LLaVA-1.5 on the CPU and
answers the same chat-completions API as vLLM and SGLang. With greedy decoding its captions
must equal the in-process backend's for the same model: the chat template, the tokens and the
pixels the model sees are the same (the client's downscale reproduces the image processor's
own resize; ``test_openai_backend.py`` checks the pixels). One difference is the server's,
not ours: it reports ``finish_reason: "length"`` whenever the token budget is used up, even
when the last token was the end token, where the in-process backend says "stop"; the
comparison allows exactly that case and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from recaption.demo.models import build_demo_model
from recaption.serving import ManagedServer, port_open
from tests.caption.conftest import cli_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"batch_size": 4, "max_new_tokens": 6, "num_workers": 1}
SERVE = "transformers serve --host {host} --port {port} {model}"
COMPARED = ("caption", "n_new_tokens", "n_prompt_tokens", "status", "error", "prompt")


def _awkward() -> list[dict[str, Any]]:
    """Two images that cannot be decoded (error rows, never sent) and a grayscale PNG."""
    gray = io.BytesIO()
    Image.new("L", (70, 50), 90).save(gray, format="PNG")
    return [
        {"key": "zz_empty", "image": b"", "ext": "jpg", "text": "an empty file"},
        {"key": "zz_html", "image": b"<html>gone</html>", "ext": "jpg", "text": "a 404 page"},
        {"key": "zz_gray", "image": gray.getvalue(), "ext": "png", "text": "a gray square"},
    ]


def _write_shards(run_dir: Path, shard_writer: Any, samples: Any) -> dict[str, int]:
    shards = {"00000": samples(20, 4), "00001": samples(21, 9) + _awkward()}
    for shard, items in shards.items():
        shard_writer(run_dir / "images", shard, items)
    return {shard: len(items) for shard, items in shards.items()}


@pytest.fixture(scope="module")
def tiny_llava(models_dir: Path) -> Path:
    return build_demo_model("tiny-llava-1.5", models_dir / "tiny-llava-1.5")


@pytest.fixture(scope="module")
def serve(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory):
    """One ``transformers serve`` of the tiny LLaVA-1.5 for the module."""
    folder = tmp_path_factory.mktemp("serve")
    server = ManagedServer(
        SERVE,
        host="127.0.0.1",
        port=None,
        model=str(tiny_llava),
        log_path=folder / "serve.log",
        state_path=folder / "serve.json",
        startup_timeout=300,
        stop_timeout=30,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_config, shard_writer, samples, caption_stage, captions_of):
    """The in-process (transformers) backend's rows and stats for the module's shards."""
    run_dir = tmp_path_factory.mktemp("in_process")
    _write_shards(run_dir, shard_writer, samples)
    assert caption_stage(make_config(run_dir, **SETTINGS)).ok
    stats = {p.name: json.loads(p.read_text()) for p in (run_dir / "captions").glob("*_stats.json")}
    return captions_of(run_dir), stats


def _assert_same_captions(ours: dict[str, list], theirs: dict[str, list]) -> None:
    assert sorted(ours) == sorted(theirs)
    for shard in ours:
        assert [r["key"] for r in ours[shard]] == [r["key"] for r in theirs[shard]]
        for a, b in zip(ours[shard], theirs[shard], strict=True):
            for column in COMPARED:
                assert a[column] == b[column], f"{shard} {a['key']}: {column} differs"
            same = a["finish_reason"] == b["finish_reason"]
            budget_edge = (
                a["finish_reason"] == "length"
                and b["finish_reason"] == "stop"
                and a["n_new_tokens"] == SETTINGS["max_new_tokens"]
            )
            assert same or budget_edge, f"{shard} {a['key']}: finish_reason differs"


def test_captions_through_transformers_serve_equal_the_in_process_backend(
    serve,
    reference,
    tiny_llava,
    tmp_path,
    make_config,
    shard_writer,
    samples,
    caption_stage,
    captions_of,
) -> None:
    run_dir = tmp_path / "run"
    sizes = _write_shards(run_dir, shard_writer, samples)
    config = make_config(
        run_dir, backend="openai", endpoint=serve.endpoint, concurrency=4, **SETTINGS
    )
    summary = caption_stage(config)
    assert summary.ok, summary.describe()
    assert summary.samples_ok + summary.samples_failed == sum(sizes.values())

    ours = captions_of(run_dir)
    theirs, their_stats = reference
    _assert_same_captions(ours, theirs)
    statuses = {r["key"]: (r["status"], r["error"]) for r in ours["00001"]}
    assert statuses["zz_empty"] == ("error", "empty image file (0 bytes)")
    assert statuses["zz_html"][0] == "error" and "not a readable image" in statuses["zz_html"][1]
    assert statuses["zz_gray"] == ("ok", None)
    for rows in ours.values():
        for row in rows:
            assert row["model"] == str(tiny_llava), "the id transformers serve lists"
            assert row["revision"] is None
            assert row["status"] == "error" or row["n_prompt_tokens"] > 16  # image tokens
    for name, stats in their_stats.items():
        mine = json.loads((run_dir / "captions" / name).read_text())
        assert set(mine) == set(stats), "the same stats keys as the transformers backend"
        for key in ("n_input", "n_ok", "n_failed", "n_new_tokens", "errors"):
            assert mine[key] == stats[key], f"{name}: {key}"
        assert mine["backend"] == "openai" and mine["device"] == serve.endpoint


def _started(output: str) -> list[tuple[int, int]]:
    found = re.findall(r"started the server \(pid (\d+)\) for http://127\.0\.0\.1:(\d+)/v1", output)
    return [(int(pid), int(port)) for pid, port in found]


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return status.exists() and "State:\tZ" in status.read_text()


def test_the_demo_config_captions_through_transformers_serve_with_one_override(
    tmp_path, models_dir, shard_writer, samples, captions_of
) -> None:
    run_dir = tmp_path / "demo"
    shard_writer(run_dir / "images", "00000", samples(30, 5))
    command = [
        sys.executable,
        "-m",
        "recaption",
        "caption",
        str(REPO / "configs" / "demo.yaml"),
        "caption.backend=openai",
        "caption.model=demo:tiny-llava-1.5",
        "caption.max_new_tokens=24",
        f"run_dir={run_dir}",
        f"demo.models_dir={models_dir}",
    ]
    result = subprocess.run(
        command, env=cli_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ((pid, port),) = _started(result.stderr)
    deadline = time.monotonic() + 15
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid) and not port_open("127.0.0.1", port), "the server outlived the stage"
    rows = captions_of(run_dir)["00000"]
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    assert all(r["model"].endswith("tiny-llava-1.5") for r in rows)
    assert all(1 <= r["n_new_tokens"] <= 24 for r in rows)  # caption.max_new_tokens


def test_transformers_serve_killed_mid_shard_fails_it_and_a_rerun_completes_it(
    serve, reference, tmp_path, make_config, shard_writer, samples, captions_of
) -> None:
    run_dir = tmp_path / "run"
    _write_shards(run_dir, shard_writer, samples)
    config = make_config(
        run_dir,
        backend="openai",
        concurrency=1,
        max_retries=1,
        retry_backoff=0.05,
        server={"command": SERVE, "startup_timeout": 300, "stop_timeout": 30},
        **SETTINGS,
    )
    captions = run_dir / "captions"
    state_path = captions / "_ledger" / "server-rank0.json"
    log_path = captions / "_ledger" / "server-rank0.log"
    command = [sys.executable, "-m", "recaption", "caption", str(config)]
    output = tmp_path / "stage.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(command, env=cli_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        answered = 0
        while time.monotonic() < deadline:
            done_first = (captions / "00000_stats.json").exists()
            answered = log_path.read_text().count("POST /v1/chat/completions") if done_first else 0
            if answered >= 4 + 2:  # shard 00000 done, two of 00001's requests answered
                break
            time.sleep(0.05)
        state = json.loads(state_path.read_text())
        os.kill(state["pid"], signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output.read_text()[-4000:]
    assert not (captions / "00001_stats.json").exists(), "killed mid-shard: not done"
    record = json.loads((captions / "_ledger" / "00001_failed.json").read_text())
    assert "was killed by SIGKILL" in record["error"] and state["endpoint"] in record["error"]

    # The rerun goes to the module's running server: where the server runs is operational.
    moved = [f"caption.endpoint={serve.endpoint}", "caption.server.command=null"]
    rerun = subprocess.run(
        command + moved, env=cli_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "1 done before" in rerun.stderr
    _assert_same_captions(captions_of(run_dir), reference[0])
