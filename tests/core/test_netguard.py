"""The download's network guard (recaption.netguard) against real HTTP servers.

Loopback tests run here, against a server on 127.0.0.1. Tests that need a non-loopback
target (10.0.0.1, 169.254.169.254) run in a subprocess inside a new network namespace
(``unshare -n``), where those addresses are put on the namespace's own ``lo``: a broken guard
can never send a packet off this machine. They skip where ``unshare`` is unavailable.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recaption.netguard import (
    LOOPBACK,
    PRIVATE,
    AddressRefused,
    NetPolicy,
    build_opener,
    literal_host_kind,
)

REPO = Path(__file__).resolve().parents[2]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """``/redirect?to=URL``: a 302 to URL; any other path: a small PNG."""

    hits: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(parsed.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = _png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), _Handler)
    server.hits = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = _serve("127.0.0.1")
    yield srv
    srv.shutdown()
    srv.server_close()


def _has_localhost() -> bool:
    """``localhost`` is answered from /etc/hosts (never a DNS query off the machine)."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return False
    return any("localhost" in line.split("#")[0].split()[1:] for line in lines)


def bypass_urls(port: int) -> list[str]:
    """The reported bypasses of the old literal check; every one reaches 127.0.0.1:port."""
    urls = [
        f"http://127.1:{port}/img",
        f"http://2130706433:{port}/img",
        f"http://0x7f000001:{port}/img",
        f"http://0177.0.0.1:{port}/img",
        f"http://127.000.000.001:{port}/img",
        f"http://127.0.0.1:{port}?@example.com/img",
        f"http://127.0.0.1:{port}#@example.com/img",
        f"http://[::ffff:127.0.0.1]:{port}/img",
        f"http://0.0.0.0:{port}/img",
    ]
    if _has_localhost():
        urls.insert(0, f"http://localhost:{port}/img")
    return urls


def test_every_bypass_is_refused_at_connect(server: ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    opener = build_opener(NetPolicy())
    for url in bypass_urls(port):
        with pytest.raises(AddressRefused) as info:
            opener.open(url, timeout=5)
        message = str(info.value)
        assert message.startswith("refused: host "), (url, message)
        assert "(download.allow_loopback is false)" in message, (url, message)
        assert "address 127.0.0.1" in message or "address 0.0.0.0" in message, (url, message)
    assert server.hits == [], "a refused URL must not reach the server"  # type: ignore[attr-defined]


def test_allow_loopback_reaches_the_same_urls(server: ThreadingHTTPServer) -> None:
    """The bypass URLs really do reach the server: the refusals above mean something."""
    port = server.server_address[1]
    opener = build_opener(NetPolicy(allow_loopback=True))
    for url in bypass_urls(port):
        with opener.open(url, timeout=5) as response:
            assert response.read() == _png(), url
    # allow_private_networks alone does not open loopback.
    with pytest.raises(AddressRefused, match="allow_loopback is false"):
        build_opener(NetPolicy(allow_private_networks=True)).open(
            f"http://127.0.0.1:{port}/img", timeout=5
        )


def test_other_schemes_are_not_followed(server: ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    opener = build_opener(NetPolicy(allow_loopback=True))
    to = urllib.parse.quote(f"ftp://127.0.0.1:{port}/x")
    with pytest.raises(AddressRefused, match="only http and https redirects are followed"):
        opener.open(f"http://127.0.0.1:{port}/redirect?to={to}", timeout=5)
    for url in ("file:///etc/hostname", f"ftp://127.0.0.1:{port}/x", "data:,secret"):
        with pytest.raises(urllib.error.URLError, match="unknown url type"):
            opener.open(url, timeout=5)


def test_literal_pre_check_parses_hosts_like_urllib() -> None:
    port = 8000
    for url in bypass_urls(port):
        netloc = urllib.parse.urlsplit(url).netloc
        assert literal_host_kind(netloc) == LOOPBACK, url
    assert literal_host_kind("localhost") == LOOPBACK
    assert literal_host_kind("img.LOCALHOST.") == LOOPBACK
    assert literal_host_kind("[::1]:80") == LOOPBACK
    assert literal_host_kind("127.0.0.%31") == LOOPBACK  # urllib unquotes the host
    assert literal_host_kind("10.1.2.3") == PRIVATE
    assert literal_host_kind("0xa.1") == PRIVATE  # 10.0.0.1
    assert literal_host_kind("169.254.169.254:80") == PRIVATE
    assert literal_host_kind("[fe80::1%25eth0]") == PRIVATE
    assert literal_host_kind("100.100.100.200") == PRIVATE  # shared (CGNAT) space, not global
    assert literal_host_kind("example.com") is None
    assert literal_host_kind("8.8.8.8:443") is None
    assert literal_host_kind("user@example.com") is None


def test_img2dataset_workers_record_each_refusal(
    server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    """End to end: img2dataset's spawned workers refuse every bypass, per URL, in the parquet."""
    from recaption.config import RunConfig
    from recaption.stages.download import run_img2dataset

    port = server.server_address[1]
    urls = bypass_urls(port)
    input_path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"t{i}" for i in range(len(urls))]}), input_path)
    config = RunConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "download": {
                "processes": 1,
                "threads": 4,
                "timeout": 5,
                "samples_per_shard": 100,
                "image_size": 8,
            },
        }
    )
    run_img2dataset(config, input_path)
    rows = pq.read_table(config.images_dir / "00000.parquet").to_pylist()
    assert sorted(r["url"] for r in rows) == sorted(urls)
    for row in rows:
        assert row["status"] == "failed_to_download", row
        assert row["error_message"].startswith("refused: host "), row
        assert "(download.allow_loopback is false)" in row["error_message"], row
    stats = json.loads((config.images_dir / "00000_stats.json").read_text())
    assert stats["successes"] == 0 and stats["failed_to_download"] == len(urls)
    assert server.hits == []  # type: ignore[attr-defined]


# -- non-loopback targets, inside a network namespace ---------------------------------------

NETNS_SCRIPT = textwrap.dedent(
    """
    import json, socket, subprocess, sys, urllib.parse
    from pathlib import Path

    # img2dataset's workers are spawned: they import this file again, so all work is in main().


    def main():
        # Safety first: run only in a fresh namespace whose one interface is lo.
        names = [name for _, name in socket.if_nameindex()]
        if names != ["lo"]:
            print("NOT_ISOLATED", names)
            sys.exit(3)
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", "10.0.0.1/32", "dev", "lo"],
            ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
        ):
            if subprocess.run(cmd, capture_output=True).returncode:
                print("IP_FAILED", cmd)
                sys.exit(4)

        sys.path.insert(0, sys.argv[1])
        import test_netguard as t
        import pyarrow as pa, pyarrow.parquet as pq
        from recaption.netguard import AddressRefused, NetPolicy, build_opener

        front = t._serve("127.0.0.1")
        private = t._serve("10.0.0.1")
        metadata = t._serve("169.254.169.254")
        fp = front.server_address[1]
        targets = {
            "private": f"http://10.0.0.1:{private.server_address[1]}/secret",
            "link_local": f"http://169.254.169.254:{metadata.server_address[1]}/latest/meta-data",
        }
        redirects = {
            k: f"http://127.0.0.1:{fp}/redirect?to=" + urllib.parse.quote(v)
            for k, v in targets.items()
        }
        out = {}

        def fetch(policy, url):
            try:
                with build_opener(policy).open(url, timeout=5) as r:
                    return "OK " + str(r.read() == t._png())
            except AddressRefused as exc:
                return str(exc)
            except Exception as exc:
                return f"OTHER {type(exc).__name__}: {exc}"

        loop = NetPolicy(allow_loopback=True)
        for k in targets:
            out["direct_" + k] = fetch(NetPolicy(), targets[k])
            out["redirect_" + k] = fetch(loop, redirects[k])
        out["hits_after_refusals"] = len(private.hits) + len(metadata.hits)
        both = NetPolicy(allow_loopback=True, allow_private_networks=True)
        out["redirect_allowed"] = fetch(both, redirects["link_local"])
        out["direct_allowed"] = fetch(NetPolicy(allow_private_networks=True), targets["private"])

        # End to end: img2dataset's workers, the demo's settings (loopback allowed).
        from recaption.config import RunConfig
        from recaption.stages.download import run_img2dataset

        work = Path(sys.argv[2])
        urls = list(redirects.values()) + list(targets.values())
        pq.write_table(pa.table({"URL": urls, "TEXT": ["t"] * len(urls)}), work / "urls.parquet")
        private.hits.clear(); metadata.hits.clear()
        config = RunConfig.model_validate({
            "run_dir": str(work / "run"),
            "download": {"processes": 1, "threads": 4, "timeout": 5, "samples_per_shard": 100,
                         "image_size": 8, "allow_loopback": True},
        })
        run_img2dataset(config, work / "urls.parquet")
        rows = pq.read_table(config.images_dir / "00000.parquet").to_pylist()
        out["e2e"] = {r["url"]: [r["status"], r["error_message"]] for r in rows}
        out["e2e_hits"] = len(private.hits) + len(metadata.hits)
        print("RESULT " + json.dumps(out))


    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture(scope="module")
def netns_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed: cannot isolate the non-loopback tests")
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"unshare -n fails here (needs root or user namespaces): {probe.stderr}")
    work = tmp_path_factory.mktemp("netns")
    script = work / "netns_guard.py"
    script.write_text(NETNS_SCRIPT)
    proc = subprocess.run(
        [unshare, "-n", sys.executable, str(script), str(Path(__file__).parent), str(work)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    if proc.returncode == 4:
        pytest.skip(f"cannot configure lo in the namespace: {proc.stdout[-500:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_private_and_link_local_are_refused_directly_and_after_redirects(
    netns_results: dict,
) -> None:
    r = netns_results
    private = "private address 10.0.0.1 (download.allow_private_networks is false)"
    link_local = "link-local address 169.254.169.254 (download.allow_private_networks is false)"
    assert r["direct_private"] == f"refused: host '10.0.0.1' resolves to {private}"
    assert r["redirect_private"] == f"refused: host '10.0.0.1' resolves to {private}"
    assert r["direct_link_local"].endswith(link_local)
    assert r["redirect_link_local"] == f"refused: host '169.254.169.254' resolves to {link_local}"
    assert r["hits_after_refusals"] == 0
    # Allowed, the same targets answer: a broken guard would have reached them.
    assert r["redirect_allowed"] == "OK True"
    assert r["direct_allowed"] == "OK True"


def test_img2dataset_workers_refuse_redirects_to_private_addresses(netns_results: dict) -> None:
    e2e = netns_results["e2e"]
    assert len(e2e) == 4
    for url, (status, error) in e2e.items():
        assert status == "failed_to_download", (url, error)
        assert error.startswith("refused: host "), (url, error)
        assert "(download.allow_private_networks is false)" in error, (url, error)
    assert netns_results["e2e_hits"] == 0
