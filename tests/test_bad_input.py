"""Bad input, table-driven, through the real command line (``python -m raysweep.tune``).

Every case: exit code 2, exactly one line on stderr naming the key or the file,
and no process left behind (only this test's own processes are looked at).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import processes_with_tag, tagged_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"


def _record(q: str, a: str, **extra) -> dict:
    return {"question": q, "answer": a, **extra}


def write_seed_dir(path: Path) -> Path:
    """A minimal valid seed-layout directory (2 forget, 3 retain questions)."""
    path.mkdir(parents=True, exist_ok=True)
    pert = lambda a: {"paraphrased_answer": a + " indeed", "perturbed_answer": [a + " not", a + " never"]}  # noqa: E731
    forget = [_record(f"Who is forget author {i}?", f"Forget author {i} writes poems.", task_id=1) for i in range(2)]
    retain = [_record(f"Who is retain author {i}?", f"Retain author {i} writes plays.") for i in range(3)]
    general = [_record(f"What is fact {i}?", f"fact {i}", perturbed_answer=["x", "y", "z"],
                       original_answer=f"The fact is fact {i}.") for i in range(2)]
    files = {
        "forget10": forget,
        "forget10_perturbed": [{**r, **pert(r["answer"])} for r in forget],
        "retain90": retain,
        "retain_perturbed": [{**r, **pert(r["answer"])} for r in retain],
        "real_authors_perturbed": general,
        "world_facts_perturbed": general,
    }
    for name, rows in files.items():
        (path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_doc() -> dict:
    return yaml.safe_load(TINY.read_text())


def local_doc(data_dir: Path) -> dict:
    doc = tiny_doc()
    doc["experiment"]["data"].update(source="local", path=str(data_dir))
    return doc


def edit_line(file: Path, index: int, new: str) -> None:
    lines = file.read_text().splitlines()
    lines[index] = new
    file.write_text("\n".join(lines) + "\n")


def set_in(doc: dict, dotted: str, value) -> dict:
    node = doc
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


# Each case: (id, builder(tmp) -> (yaml document or raw text, extra CLI args), expected text in the line)
def _doc(fn):
    return lambda tmp: (fn(tiny_doc()), [])


def _local(mutate_files, key):
    def build(tmp):
        data = write_seed_dir(tmp / "data")
        mutate_files(data)
        return local_doc(data), []
    return build


CASES = [
    ("yaml-syntax", lambda tmp: ("experiment: {name: [oops\n", []), "not valid YAML"),
    ("unknown-top-key", _doc(lambda d: set_in(d, "extras", 1)), "extras"),
    ("wrong-type", _doc(lambda d: set_in(d, "experiment.training.epochs", "five")), "experiment.training.epochs"),
    ("unknown-method", _doc(lambda d: set_in(d, "search.methods", ["ME+GD", "XYZ+GD"])), "search.methods.1"),
    ("unknown-scenario", _doc(lambda d: set_in(d, "experiment.scenario", "lunar")), "experiment.scenario"),
    ("empty-methods", _doc(lambda d: set_in(d, "search.methods", [])), "search.methods"),
    ("lr-not-positive", _doc(lambda d: set_in(d, "experiment.training.lr", -1e-3)), "experiment.training.lr"),
    ("low-ge-high", _doc(lambda d: set_in(d, "search.space.lr", {"loguniform": [1e-2, 1e-3]})), "search.space.lr.loguniform"),
    ("epochs-zero", _doc(lambda d: set_in(d, "experiment.training.epochs", 0)), "experiment.training.epochs"),
    ("num-samples-zero", _doc(lambda d: set_in(d, "search.num_samples", 0)), "search.num_samples"),
    ("max-concurrent-zero", _doc(lambda d: set_in(d, "search.max_concurrent", 0)), "search.max_concurrent"),
    ("beta-not-positive", _doc(lambda d: set_in(d, "search.space.beta", {"uniform": [0.0, 0.5]})), "search.space.beta"),
    ("missing-data-dir", _doc(lambda d: set_in(d, "experiment.data", {"source": "local", "path": "/no/such/data"})), "experiment.data.path"),
    ("jsonl-not-json", _local(lambda p: edit_line(p / "retain90.json", 1, "{not json"), "retain90"), "retain90.json:2"),
    ("record-missing-answer", _local(lambda p: edit_line(p / "forget10.json", 0, json.dumps({"question": "q?", "task_id": 1})), "answer"), "answer"),
    ("empty-forget-set", lambda tmp: (set_in(local_doc(write_seed_dir(tmp / "data")), "experiment.data.task_ids", [7]), []), "task_id"),
    ("forget-retain-overlap", _local(lambda p: edit_line(p / "retain90.json", 0, json.dumps(_record("Who is forget author 0?", "x"))), "question"), "question"),
    ("perturbed-wrong-length", _local(lambda p: edit_line(p / "retain_perturbed.json", 0, json.dumps({**_record("Who is retain author 0?", "a"), "paraphrased_answer": "b", "perturbed_answer": ["c"]})), "perturbed_answer"), "perturbed_answer"),
    ("model-path-missing", _doc(lambda d: set_in(d, "experiment.model.name_or_path", "/no/such/model")), "experiment.model.name_or_path"),
    ("unknown-prompt-template", _doc(lambda d: set_in(d, "experiment.model.prompt_template", "vicuna")), "experiment.model.prompt_template"),
    ("gpu-without-gpus", _doc(lambda d: set_in(d, "search.resources.use_gpu", True)), "use_gpu"),
    ("unknown-mlflow-scheme", _doc(lambda d: set_in(d, "tracking.uri", "gopher://x/y")), "tracking.uri"),
    ("resume-empty-dir", lambda tmp: (tiny_doc(), ["--resume", "--storage", str(tmp / "empty"), "--name", "none"]), "resume"),
    ("set-unknown-key", lambda tmp: (tiny_doc(), ["--set", "search.schedular.type=asha"]), "search.schedular"),
    ("unwritable-storage", lambda tmp: (tiny_doc(), ["--storage", "/proc/raysweep-results"]), "/proc/raysweep-results"),
    ("num-samples-flag-zero", lambda tmp: (tiny_doc(), ["--num-samples", "0"]), "search.num_samples"),
    ("idk-file-missing", _doc(lambda d: set_in(d, "experiment.data.idk_path", "/no/idk.jsonl")), "experiment.data.idk_path"),
    ("range-two-kinds", _doc(lambda d: set_in(d, "search.space.epochs", {"int": [1, 3], "uniform": [1, 3]})), "search.space.epochs"),
    ("unknown-override-method", _doc(lambda d: set_in(d, "search.overrides", {"QQ+GD": {"lr": 1e-3}})), "search.overrides.QQ+GD"),
]
CASES += [
    ("unknown-protocol", _doc(lambda d: set_in(d, "experiment.protocol", "papr")), "experiment.protocol"),
    ("supplement-overlaps-eval", _doc(lambda d: set_in(set_in(set_in(d, "experiment.scenario", "continual"),
                                                              "experiment.continual.retain_min_size", 5000),
                                                       "experiment.continual.supplement_split", "world_facts_perturbed")),
     "experiment.continual.supplement_split"),
]


def test_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case_id, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, case_id, build, expected):
    (tmp_path / "empty").mkdir()
    doc, extra = build(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env, tag = tagged_env(env)
    proc = subprocess.run([sys.executable, "-m", "raysweep.tune", "--space", str(space), *extra],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("error: ")
    assert processes_with_tag(tag) == [], "the command left a process (Ray?) behind"
    assert "Ray" not in proc.stdout  # never got as far as starting it


def _other_command_cases():
    tiny = str(TINY)
    return [
        # raysweep.evaluate
        ("evaluate-space-missing", ["-m", "raysweep.evaluate", "--model", "embedded", "--space", "/no/such.yaml"],
         "/no/such.yaml"),
        ("evaluate-model-missing", ["-m", "raysweep.evaluate", "--model", "/no/such/model", "--space", tiny],
         "experiment.model.name_or_path"),
        ("evaluate-unknown-set", ["-m", "raysweep.evaluate", "--model", "embedded", "--space", tiny,
                                  "--set", "experiment.eval.bogus=1"], "experiment.eval.bogus"),
        ("evaluate-no-space", ["-m", "raysweep.evaluate", "--model", "embedded"], "--space"),
        # raysweep.prepare
        ("prepare-bad-value", ["-m", "raysweep.prepare", "--n-authors", "0"], "--n-authors"),
        ("prepare-bad-model-value", ["-m", "raysweep.prepare", "--model-hidden-size", "-3"], "--model-hidden-size"),
        ("prepare-not-an-int", ["-m", "raysweep.prepare", "--n-authors", "many"], "--n-authors"),
        # the console script (raysweep.cli)
        ("cli-unknown-command", ["-m", "raysweep.cli", "bogus"], "usage: raysweep"),
        ("cli-no-command", ["-m", "raysweep.cli"], "usage: raysweep"),
        ("cli-tune-bad-space", ["-m", "raysweep.cli", "tune", "--space", "/no/such.yaml"], "/no/such.yaml"),
        ("cli-evaluate-unknown-set", ["-m", "raysweep.cli", "evaluate", "--model", "embedded", "--space", tiny,
                                      "--set", "search.nope=1"], "search.nope"),
    ]


@pytest.mark.parametrize("case_id, args, expected", _other_command_cases(), ids=[c[0] for c in _other_command_cases()])
def test_other_commands_exit_2_on_bad_input(tmp_path, case_id, args, expected):
    """raysweep.evaluate, raysweep.prepare and the ``raysweep`` console script: exit 2, the
    last stderr line names the flag / file / key (argparse prints its usage above it), no
    traceback, nothing built (the cache stays empty)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYSWEEP_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert lines and expected in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    if not lines[-1].startswith("usage:") and "raysweep.prepare:" not in lines[-1] and "raysweep.evaluate:" not in lines[-1]:
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_console_script_entry_point_exits_2(tmp_path):
    """The installed ``raysweep`` script (pyproject [project.scripts]) where it is on PATH."""
    import shutil

    script = shutil.which("raysweep")
    if script is None:
        pytest.skip("the raysweep console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([script, "tune", "--space", str(tmp_path / "none.yaml")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.yaml'}: file does not exist"]
