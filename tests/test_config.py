"""Config validation: every bad input is one line on stderr naming file and key, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysweep.config import ConfigError, load_config, load_or_exit

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"


def write(tmp_path: Path, doc, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def tiny_doc() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_spaces_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative data paths are relative to the repository root
    if path.name == "real_world.yaml" and not (ROOT.parent / "shared" / "data" / "real_world").is_dir():
        pytest.skip("real_world.yaml points at ../shared/data/real_world, absent here")
    cfg = load_config(path)
    assert cfg.search.methods


# (description, mutation of the tiny document or raw text, key expected in the message)
BAD = [
    ("yaml syntax", "experiment: [unclosed\n", "line"),
    ("top level list", "- a\n- b\n", "top level"),
    ("unknown top key", lambda d: d.update(bogus=1), "bogus"),
    ("unknown nested key", lambda d: d["experiment"]["training"].update(lrr=1e-3), "experiment.training.lrr"),
    ("wrong type", lambda d: d["experiment"]["training"].update(epochs="many"), "experiment.training.epochs"),
    ("unknown method", lambda d: d["search"].update(methods=["ME+GD", "FOO+GD"]), "search.methods.1"),
    ("unknown training method", lambda d: d["experiment"]["training"].update(method="XX"), "experiment.training.method"),
    ("unknown scenario", lambda d: d["experiment"].update(scenario="mars"), "experiment.scenario"),
    ("empty methods", lambda d: d["search"].update(methods=[]), "search.methods"),
    ("lr <= 0", lambda d: d["experiment"]["training"].update(lr=0), "experiment.training.lr"),
    ("range low >= high", lambda d: d["search"]["space"].update(lr={"loguniform": [1e-3, 1e-4]}), "search.space.lr.loguniform"),
    ("searched lr <= 0", lambda d: d["search"]["space"].update(lr={"uniform": [-1.0, 1.0]}), "search.space.lr"),
    ("epochs 0", lambda d: d["experiment"]["training"].update(epochs=0), "experiment.training.epochs"),
    ("searched epochs 0", lambda d: d["search"]["space"].update(epochs={"int": [0, 3]}), "search.space.epochs"),
    ("num_samples 0", lambda d: d["search"].update(num_samples=0), "search.num_samples"),
    ("max_concurrent 0", lambda d: d["search"].update(max_concurrent=0), "search.max_concurrent"),
    ("beta <= 0", lambda d: d["experiment"]["training"].update(beta=-0.1), "experiment.training.beta"),
    ("range with two kinds", lambda d: d["search"]["space"].update(lr={"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}), "search.space.lr"),
    ("override of unknown method", lambda d: d["search"]["overrides"].update({"GA+XX": {"lr": 1e-3}}), "search.overrides.GA+XX"),
    ("missing data directory", lambda d: d["experiment"]["data"].update(source="local", path="/nonexistent/dir"), "experiment.data.path"),
    ("local without path", lambda d: d["experiment"]["data"].update(source="local"), "experiment.data.path"),
    ("model path missing", lambda d: d["experiment"]["model"].update(name_or_path="./no/such/model"), "experiment.model.name_or_path"),
    ("unknown prompt template", lambda d: d["experiment"]["model"].update(prompt_template="alpaca"), "experiment.model.prompt_template"),
    ("unknown mlflow scheme", lambda d: d["tracking"].update(uri="ftp://host/x"), "tracking.uri"),
    ("idk file missing", lambda d: d["experiment"]["data"].update(idk_path="/nope/idk.jsonl"), "experiment.data.idk_path"),
    ("synthetic unknown key", lambda d: d["experiment"]["data"].update(synthetic={"n_autors": 3}), "experiment.data.synthetic.n_autors"),
]


@pytest.mark.parametrize("desc, mutate, key", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_key(tmp_path, desc, mutate, key):
    if isinstance(mutate, str):
        path = write(tmp_path, mutate)
    else:
        doc = tiny_doc()
        mutate(doc)
        path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = info.value.one_line()
    assert "\n" not in line
    assert str(path) in line and key in line, line


def test_missing_forget_file_in_local_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "retain90.json").write_text('{"question": "q", "answer": "a"}\n')
    doc = tiny_doc()
    doc["experiment"]["data"].update(source="local", path=str(data))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, doc))
    assert "experiment.data.forget_split" in str(info.value) and "forget10.json" in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/space.yaml")


def test_set_overrides(tmp_path):
    cfg = load_config(TINY, ["experiment.training.lr=3e-4", "search.methods=[GA+GD]",
                             "experiment.eval.nli_model=null"])
    assert cfg.experiment.training.lr == 3e-4
    assert cfg.search.methods == ["GA+GD"]
    assert cfg.experiment.eval.nli_model is None


@pytest.mark.parametrize("override, key", [
    ("experiment.training.nope=1", "experiment.training.nope"),
    ("experiment.training.lr=-1", "experiment.training.lr"),
    ("experiment.training.lr.x=1", "experiment.training.lr"),
    ("novalue", "novalue"),
])
def test_bad_set_overrides(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert key in str(info.value)


def test_space_for_merges_overrides():
    cfg = load_config(TINY)
    me = cfg.search.space_for("ME+GD")
    ga = cfg.search.space_for("GA+GD")
    assert me.forget_coeff.uniform == (0.05, 0.5)
    assert ga.forget_coeff.uniform == (0.1, 1.0)
    assert me.lr == ga.lr


def test_load_or_exit_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, {"experiment": {"training": {"lr": -1}}})
    with pytest.raises(SystemExit) as info:
        load_or_exit(path)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "experiment.training.lr" in err and str(path) in err


def test_unlearn_cli_bad_input_exit_2(tmp_path):
    path = write(tmp_path, {"search": {"methods": ["NOPE"]}})
    proc = subprocess.run([sys.executable, "-m", "raysweep.unlearn", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.methods.0" in lines[0], proc.stderr


def test_tpe_startup_trials_scale_with_the_budget():
    from raysweep.config import SearchConfig

    assert [SearchConfig(num_samples=n).startup_trials() for n in (4, 8, 12, 40, 100)] == [2, 2, 3, 10, 10]
    assert SearchConfig(num_samples=12, tpe_startup_trials=5).startup_trials() == 5
