"""raysweep.data.fetch: the seed's data files from a (loopback) server, checked by sha256, cached.

The files themselves are never in this repository: the tests serve ``../shared/data`` (the
seed's byte-identical copies) from a loopback HTTP server at ``$RAYSWEEP_SEED_BASE_URL`` and skip
when that directory is absent.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from raysweep.data import fetch
from raysweep.data.fetch import BASE_URL_ENV, SEED_FILES, FetchError

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"  # holds data/real_world/*.json, data/idontknow.jsonl, data/tofu/
needs_shared = pytest.mark.skipif(not (SHARED / "data" / "real_world").is_dir() or not (SHARED / "data" / "idontknow.jsonl").is_file(),
                                  reason="../shared/data (the seed's data files) not present")


class Server:
    """A loopback HTTP server over ``directory`` that counts the requests it answers."""

    def __init__(self, directory: Path):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("RAYSWEEP_CACHE", str(path))
    return path


@pytest.fixture
def shared_server(monkeypatch):
    server = Server(SHARED)
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    yield server
    server.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pinned_commit_and_default_url():
    assert len(fetch.SEED_COMMIT) == 40 and fetch.SEED_COMMIT.startswith("b622294")
    assert fetch.DEFAULT_BASE_URL == f"https://raw.githubusercontent.com/sail-sg/closer-look-LLM-unlearning/{fetch.SEED_COMMIT}"
    assert set(fetch.BUNDLES["real_world"]) == {f"data/real_world/{n}.json" for n in
                                                ("forget", "forget_perturbed", "neighbor", "neighbor_perturbed")}


@needs_shared
def test_recorded_checksums_match_the_shared_copies():
    for path, (digest, size) in SEED_FILES.items():
        local = SHARED / path
        if local.is_file():
            assert (sha(local), local.stat().st_size) == (digest, size), path


@needs_shared
def test_download_then_cache_reuse(cache, shared_server):
    files = fetch.fetch_bundle("real_world")
    assert [f.name for f in files] == ["forget.json", "forget_perturbed.json", "neighbor.json", "neighbor_perturbed.json"]
    assert all(f.parent == cache / "seed" / fetch.SEED_COMMIT / "data" / "real_world" for f in files)
    for f in files:
        assert f.read_bytes() == (SHARED / "data" / "real_world" / f.name).read_bytes()
    assert len(shared_server.requests) == 4
    assert fetch.seed_dir("real_world") == files[0].parent
    assert len(shared_server.requests) == 4, "a second use must not download again"
    assert not list(files[0].parent.glob("*.part")), "no partial download left behind"


@needs_shared
def test_seed_file_idontknow(cache, shared_server):
    path = fetch.seed_file("idontknow.jsonl")
    assert isinstance(path, Path) and path.name == "idontknow.jsonl"
    assert path.read_bytes() == (SHARED / "data" / "idontknow.jsonl").read_bytes()
    from raysweep.data.templates import load_idk_templates

    assert len(load_idk_templates(str(path))) >= 10


@needs_shared
def test_corrupt_cached_file_is_fetched_again(cache, shared_server):
    path = fetch.seed_file("idontknow.jsonl")
    path.write_text("tampered\n")
    assert fetch.seed_file("idontknow.jsonl").read_bytes() == (SHARED / "data" / "idontknow.jsonl").read_bytes()
    assert len(shared_server.requests) == 2


@needs_shared
def test_checksum_mismatch_names_file_url_and_command(cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED / "data", mirror / "data", ignore=shutil.ignore_patterns("tofu"))
    (mirror / "data" / "idontknow.jsonl").write_text("I don't know.\n")  # not the pinned bytes
    server = Server(mirror)
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    try:
        with pytest.raises(FetchError) as info:
            fetch.seed_file("idontknow.jsonl")
    finally:
        server.close()
    line = info.value.one_line()
    assert "\n" not in line
    assert "data/idontknow.jsonl" in line and "checksum mismatch" in line
    assert f"{server.url}/data/idontknow.jsonl" in line
    assert "python -m raysweep.data fetch idk" in line
    assert not (cache / "seed" / fetch.SEED_COMMIT / "data" / "idontknow.jsonl").exists(), "a bad download is not kept"


def test_offline_names_file_url_and_command(cache, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(BASE_URL_ENV, url)
    with pytest.raises(FetchError) as info:
        fetch.seed_dir("real_world")
    line = info.value.one_line()
    assert "data/real_world/forget.json" in line and f"{url}/data/real_world/forget.json" in line
    assert "cannot download" in line and "python -m raysweep.data fetch real_world" in line


def test_http_404_is_a_fetch_error(cache, tmp_path, monkeypatch):
    server = Server(tmp_path)  # serves an empty directory
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    try:
        with pytest.raises(FetchError, match="HTTP 404"):
            fetch.seed_file("idontknow.jsonl")
    finally:
        server.close()


def _cli(args, env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-m", "raysweep.data", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@needs_shared
def test_cli_fetch_to_dir_then_offline_from_file_url(tmp_path, shared_server):
    out = tmp_path / "offline"
    result = _cli(["fetch", "idk", "--to", str(out)], {BASE_URL_ENV: shared_server.url,
                                                        "RAYSWEEP_CACHE": str(tmp_path / "c1")})
    assert result.returncode == 0, result.stderr
    assert (out / "data" / "idontknow.jsonl").read_bytes() == (SHARED / "data" / "idontknow.jsonl").read_bytes()
    assert f"file://{out}" in result.stderr
    # On the offline machine: the --to directory is the mirror.
    result = _cli(["fetch", "idk"], {BASE_URL_ENV: f"file://{out}", "RAYSWEEP_CACHE": str(tmp_path / "c2")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c2" / "seed" / fetch.SEED_COMMIT / "data" / "idontknow.jsonl").is_file()


def test_cli_offline_exit_2_one_line(tmp_path):
    result = _cli(["fetch", "real_world"], {BASE_URL_ENV: closed_port_url(), "RAYSWEEP_CACHE": str(tmp_path)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: seed data file data/real_world/forget.json")


def test_preflight_data_seed_offline_exits_2(cache, monkeypatch, capsys):
    from raysweep.config import parse_config
    from raysweep.scenarios import preflight_data

    monkeypatch.setenv(BASE_URL_ENV, closed_port_url())
    cfg = parse_config({"experiment": {"scenario": "real_world", "data": {
        "source": "seed", "forget_split": "forget", "retain_split": "neighbor", "task_ids": None}}}).experiment
    with pytest.raises(SystemExit) as info:
        preflight_data(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m raysweep.data fetch real_world" in err[0]


@needs_shared
def test_preflight_and_resolve_read_the_fetched_real_world(cache, shared_server):
    from raysweep.config import parse_config
    from raysweep.scenarios import load_run_data, preflight_data, resolve

    cfg = parse_config({"experiment": {"scenario": "real_world", "model": {"name_or_path": "some/model"}, "data": {
        "source": "seed", "forget_split": "forget", "retain_split": "neighbor", "task_ids": None,
        "select": {"forget_people": 2, "neighbor_people": 2}}}}).experiment
    preflight_data(cfg)  # no exit: fetched and checked
    resolved = resolve(cfg)
    assert resolved.data_dir == cache / "seed" / fetch.SEED_COMMIT / "data" / "real_world"
    data = load_run_data(cfg, resolved)
    assert len({r.name for r in data.forget}) == 2 and data.eval_sets["forget"].records


def test_config_rejects_path_and_unknown_split_with_seed():
    from raysweep.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"experiment\.data\.path: not used with source 'seed'"):
        parse_config({"experiment": {"data": {"source": "seed", "path": "/tmp"}}}, "f.yaml")
    with pytest.raises(ConfigError, match=r"experiment\.data\.forget_split: 'forget10' is not in the seed's data/real_world"):
        parse_config({"experiment": {"scenario": "real_world", "data": {"source": "seed"}}}, "f.yaml")
