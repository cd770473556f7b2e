"""Config loading never raises a traceback on bad input (property-based, hypothesis).

Whatever bytes a sweep file holds, and whatever structure its YAML has, ``load_or_exit`` either
returns a valid ``SweepConfig`` or exits 2 with one line on stderr naming the file: never
another exception.  The fixed cases below run through the real command line too.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysweep.config import MAX_NODES, ConfigError, SweepConfig, load_config, load_or_exit

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"
TINY_DOC = yaml.safe_load(TINY.read_text())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load(path: Path, capsys, overrides: list[str] | None = None):
    """``load_or_exit``'s outcome: the config, or the stderr line of an exit-2 error."""
    capsys.readouterr()
    try:
        return load_or_exit(path, overrides)
    except SystemExit as stop:
        assert stop.code == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"error: {path}"), lines[0]
        return lines[0]


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_are_a_config_or_exit_2(tmp_path, capsys, data):
    path = tmp_path / "space.yaml"
    path.write_bytes(data)
    out = _load(path, capsys)
    assert isinstance(out, (SweepConfig, str))


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["ME+GD", "GA", "NPO+KL", "embedded", "asha", "grid", "1e-4", "-1"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["low", "uniform", "int", "choice", "loguniform",
                                                             "lr", "x", "enabled", "type"]), inner, max_size=3)),
    max_leaves=10,
)


def _paths(doc, prefix=()):
    """Every key path of the tiny document (sections and leaves)."""
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.append(prefix + (key,))
            out.extend(_paths(value, prefix + (key,)))
    return out


TINY_PATHS = _paths(TINY_DOC)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(TINY_PATHS), _values), min_size=1, max_size=4))
def test_random_structures_in_the_schema_are_a_config_or_exit_2(tmp_path, capsys, edits):
    """tiny.yaml with random values at random keys, so the fuzzing reaches the validators."""
    doc = copy.deepcopy(TINY_DOC)
    for keys, value in edits:
        node = doc
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    out = _load(path, capsys)
    assert isinstance(out, (SweepConfig, str))


@FUZZ
@given(key=st.one_of(st.sampled_from([".".join(p) for p in TINY_PATHS]), st.text(max_size=20)),
       value=st.text(max_size=20))
def test_random_set_overrides_are_a_config_or_exit_2(tmp_path, capsys, key, value):
    out = _load(TINY, capsys, [f"{key}={value}"])
    assert isinstance(out, (SweepConfig, str))


def test_tiny_yaml_itself_loads(capsys):
    assert isinstance(_load(TINY, capsys), SweepConfig)


RECURSIVE = "experiment: &a\n  name: x\n  model: *a\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg")
) + "experiment: {name: *g}\n"


@pytest.mark.parametrize("name,content,needle", [
    ("empty", b"", "file is empty"),
    ("comments-only", b"# nothing here\n", "file is empty"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not UTF-8 text"),
    ("latin-1", "experiment: {name: caf\u00e9}\n".encode("latin-1"), "not UTF-8 text"),
    ("list", b"- experiment\n- search\n", "top level must be a mapping"),
    ("recursive-alias", RECURSIVE.encode(), "experiment.model: refers to itself"),
    ("alias-bomb", BOMB.encode(), f"more than {MAX_NODES}"),
    ("bad-timestamp", b"experiment: {name: 2001-13-45}\n", "not valid YAML"),
])
def test_bad_files_name_the_file_and_exit_2_on_the_command_line(tmp_path, name, content, needle):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(path)
    proc = subprocess.run([sys.executable, "-m", "raysweep.tune", "--space", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and needle.split(":")[-1].strip() in lines[0], proc.stderr


def test_a_directory_and_a_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_set_below_a_list_or_with_an_empty_key_is_named():
    with pytest.raises(ConfigError, match="search.methods: is not a section"):
        load_config(TINY, ["search.methods.x=1"])
    with pytest.raises(ConfigError, match="empty key part"):
        load_config(TINY, ["experiment..name=x"])
