"""Shared fixtures: a very small embedded setup (synthetic data + tiny target/retain models),
built once per test session into a temporary cache.

``RAYSWEEP_CACHE`` points at that temporary cache for the whole session, so nothing a test
builds lands in ``~/.cache/raysweep``.  Set ``RAYSWEEP_TEST_CACHE=/some/dir`` to keep the cache
between sessions (the build is then reused, keyed by the specs as usual).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class EmbeddedSpecs:
    synthetic: object  # raysweep.data.synthetic.SyntheticSpec
    model: object  # raysweep.models.TinyModelSpec


def small_embedded_specs() -> EmbeddedSpecs:
    """Specs of the test session's embedded setup: 12 authors x 4 questions (+ 2 holdout
    authors, a few general-knowledge and prior questions) and 6 real people x 3 questions (2
    forgotten, 2 training and 2 evaluation neighbours; ~80 QA pairs in all) and a ~0.2 M parameter
    Llama that memorizes them in about a minute on 2 CPU cores."""
    from raysweep.data.synthetic import SyntheticSpec
    from raysweep.models import TinyModelSpec

    synthetic = SyntheticSpec(
        n_authors=12, n_questions=4, n_holdout_authors=2, n_real_authors=4, n_world_facts=4,
        n_prior_entities=4, n_prior_questions=1, n_perturbed=3, n_real_people=6, n_person_questions=3,
    )
    model = TinyModelSpec(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=512,
        max_position_embeddings=128, max_length=96, lr=3e-3, batch_size=8, warmup_steps=10,
        min_epochs=20, max_epochs=80, eval_every=5, stop_recall=0.95, max_new_tokens=48,
    )
    return EmbeddedSpecs(synthetic, model)


@pytest.fixture(scope="session")
def raysweep_cache(tmp_path_factory):
    """The session's cache directory; ``RAYSWEEP_CACHE`` is set to it for the whole session."""
    keep = os.environ.get("RAYSWEEP_TEST_CACHE")
    path = keep if keep else str(tmp_path_factory.mktemp("raysweep_cache"))
    old = os.environ.get("RAYSWEEP_CACHE")
    os.environ["RAYSWEEP_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("RAYSWEEP_CACHE", None)
    else:
        os.environ["RAYSWEEP_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _session_cache(raysweep_cache):
    """Autouse: every test runs with ``RAYSWEEP_CACHE`` at the session's temporary cache."""
    return raysweep_cache


@pytest.fixture(scope="session")
def embedded_specs() -> EmbeddedSpecs:
    """The (synthetic, model) specs the ``embedded`` fixture is built from."""
    return small_embedded_specs()


@pytest.fixture(scope="session")
def embedded(embedded_specs, raysweep_cache):
    """``EmbeddedArtifacts`` of the small embedded setup (built once per session, ~30 s).

    ``stats["build_seconds"]`` is the build time; ``stats["target"]["recall_train"]`` the
    target model's greedy ROUGE-L recall on its training QA."""
    from raysweep.prepare import ensure_embedded

    return ensure_embedded(embedded_specs.synthetic, embedded_specs.model, cache_dir=raysweep_cache,
                           log=lambda msg: None)


def free_port() -> int:
    """A TCP port nothing listens on now (for a gloo / DeepSpeed rendezvous), instead of a fixed
    one that a parallel session or a leftover process may hold."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git_status(root) -> str | None:
    """``git status --porcelain`` of the checkout holding ``root``; None when it is not one."""
    import subprocess

    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _checkout_unchanged():
    """The suite leaves the checkout as it found it: no ``mlflow.db``, ``ray_results/``,
    ``report.md``… written into the repository (every sweep runs in a tmp directory).

    Recorded at session start, compared at its end (an error at teardown of the last test);
    nothing is checked when the tree is not a git checkout. ``RAYSWEEP_SKIP_CHECKOUT_CHECK=1``
    turns it off while editing files during a run."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    before = None if os.environ.get("RAYSWEEP_SKIP_CHECKOUT_CHECK") else _git_status(root)
    yield
    if before is None:
        return
    after = _git_status(root)
    if after is None:
        return
    new = sorted(set(after.splitlines()) - set(before.splitlines()))
    assert not new, "the test session changed the checkout (git status --porcelain):\n" + "\n".join(new)


TAG_ENV = "RAYSWEEP_TEST_PROCESS_TAG"


def tagged_env(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """``env`` plus a unique tag that every process started from it inherits (Ray's gcs_server,
    raylet and workers too), so a test can find *its own* leftovers, not any Ray on the machine."""
    import uuid

    tag = uuid.uuid4().hex
    return {**env, TAG_ENV: tag}, tag


def processes_with_tag(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (Linux /proc; empty elsewhere)."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat", "rb") as s:
                        if s.read().rsplit(b")", 1)[-1].split()[0] != b"Z":  # not a zombie
                            found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found
