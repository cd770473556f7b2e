"""The paper's data files, downloaded on first use from the seed repository at a pinned commit.

The seed code (``sail-sg/closer-look-LLM-unlearning``, commit :data:`SEED_COMMIT`) ships the
real-world people (``data/real_world/*.json``), TOFU's splits (``data/tofu/*.json``) and TOFU's
rejection templates (``data/idontknow.jsonl``). raysweep never ships them: ``data.source: seed``
and :func:`seed_file` fetch each file from ``$RAYSWEEP_SEED_BASE_URL`` (default: the raw GitHub
URL at the pinned commit; ``file:///DIR`` or a local HTTP mirror work too), check it against the
sha256 recorded in :data:`SEED_FILES` and keep it under ``$RAYSWEEP_CACHE/seed/<commit>/`` in the
seed's own layout (``data/real_world/forget.json`` ...). A cached file is re-hashed on every use
and never downloaded again while it matches.

``python -m raysweep.data fetch {real_world,idk,tofu} [--to DIR]`` fetches a bundle ahead of time,
for machines that will run offline later (``--to DIR`` writes ``DIR/data/...``: point
``$RAYSWEEP_SEED_BASE_URL`` at ``file://DIR`` there, or ``data.source: local`` at
``DIR/data/real_world``).

Every failure (offline, HTTP error, checksum mismatch) raises :class:`FetchError`, whose
:meth:`FetchError.one_line` names the file, the URL and the fetch command.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

SEED_REPO = "sail-sg/closer-look-LLM-unlearning"
SEED_COMMIT = "b622294965f8b40feb5383c9e93dbdb26a76b6b3"
BASE_URL_ENV = "RAYSWEEP_SEED_BASE_URL"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{SEED_REPO}/{SEED_COMMIT}"
CACHE_ENV = "RAYSWEEP_CACHE"
TIMEOUT_S = 60.0

# Path in the seed repository -> (sha256, size in bytes), read from the pinned commit
# (`git show b622294:<path> | sha256sum`); ../shared/data holds byte-identical copies.
SEED_FILES: dict[str, tuple[str, int]] = {
    "data/idontknow.jsonl": ("eb9a1e32a6f4112088306e1a65d297240f75513dd5223b2acb326454675fd605", 3980),
    "data/real_world/forget.json": ("a75f115d342109985e1626ab459171869dad98b978ee202c273c132e1243b535", 299021),
    "data/real_world/forget_perturbed.json": ("efcf9f2872e4d40a377cddf03eae127a0f5ab3b9d6c2f3bc46fa0410bd2041d4", 524357),
    "data/real_world/neighbor.json": ("10f0a78b7bc16e3346785b00fc704e118475e6dbb0f26a34bf3a2b1872a6f7db", 369244),
    "data/real_world/neighbor_perturbed.json": ("2ff942325e8a2a9ece38a835b730f0eb608ca0079939a78ccea953c2ce4de4e7", 582988),
    "data/tofu/forget01.json": ("5eb0a84866c72488ad864055365c33aec785a4a05e9e5694b9c341e04b60466a", 122358),
    "data/tofu/forget01_perturbed.json": ("f7043286055b6dd047d7effd92a35095009d6d7b31181904e65a8161ff8e9f00", 686011),
    "data/tofu/forget05.json": ("a8c207a905af73ea4797b1af92a14cf458f42df567c941f7284f87d930096f4b", 603987),
    "data/tofu/forget05_perturbed.json": ("94a98e8d7e9cbd2f6e897f41a5609f6b9c3954c31c41eb738c0b48ebd5c003ed", 2431842),
    "data/tofu/forget10.json": ("27478a35de9a9d2877c907dea4b461db40a993736543c87f90099b0c81caec61", 1038342),
    "data/tofu/forget10_perturbed.json": ("edb24ec1f01e0cf37ec54ba44d418d808b70f2195441094428e7288bd703d227", 4037550),
    "data/tofu/real_authors_perturbed.json": ("9cd44ceefd60eb18e04be622018bde3d69a7837184879100b86ccd06fb598ab4", 27543),
    "data/tofu/retain10.json": ("c8553c3e5f09b40bee371dd1195c699509699f9a6abb2a3ac92c6a603e5a2297", 103596),
    "data/tofu/retain50.json": ("6dcc828b669c09b1a537776ef7ac80d7e51a9e2d76af5c827543c3c01086625e", 510678),
    "data/tofu/retain90.json": ("debcf019c41db7b30b62ca6ad41fd8a4bcd29a5b321c21d2961974e308dfca55", 962987),
    "data/tofu/retain_perturbed.json": ("fc69f33bad70d3dca65920bdb54380039e3e8872dd16bbae20c1a839b99533fb", 641057),
    "data/tofu/world_facts_perturbed.json": ("75d0a5e7246e2836859f7722858e2045b9d2198a8e671bd17edfc8c122874dad", 32536),
}

# Bundles of `python -m raysweep.data fetch NAME`; the directory bundles are `data.source: seed`.
BUNDLES: dict[str, tuple[str, ...]] = {
    "real_world": tuple(p for p in SEED_FILES if p.startswith("data/real_world/")),
    "tofu": tuple(p for p in SEED_FILES if p.startswith("data/tofu/")),
    "idk": ("data/idontknow.jsonl",),
}
# Which bundle `data.source: seed` reads for a scenario.
SCENARIO_BUNDLE = {"real_world": "real_world", "fictitious": "tofu", "continual": "tofu"}


class FetchError(RuntimeError):
    """A seed file that could not be fetched or does not match its recorded sha256."""

    def __init__(self, path: str, url: str, message: str, bundle: str):
        self.path, self.url, self.message, self.bundle = path, url, message, bundle
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return (f"error: seed data file {self.path}: {self.message} (from {self.url}); on a machine with "
                f"internet run `python -m raysweep.data fetch {self.bundle}`, or set ${BASE_URL_ENV} "
                "to a mirror").replace("\n", " ")


def base_url() -> str:
    return (os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def cache_dir() -> Path:
    """``$RAYSWEEP_CACHE/seed/<commit>`` (default cache ``~/.cache/raysweep``)."""
    root = os.environ.get(CACHE_ENV)
    root_path = Path(root).expanduser() if root else Path("~/.cache/raysweep").expanduser()
    return root_path / "seed" / SEED_COMMIT


def bundle_of(path: str) -> str:
    return next(name for name, files in BUNDLES.items() if path in files)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:  # noqa: S310
        shutil.copyfileobj(response, out)


def fetch_file(path: str, root: Path | str | None = None, *, url: str | None = None,
               timeout: float = TIMEOUT_S) -> Path:
    """``<root>/<path>`` (root default :func:`cache_dir`), downloaded if missing or corrupt.

    ``path`` is a key of :data:`SEED_FILES`. Raises :class:`FetchError` when the download fails
    or the bytes do not hash to the recorded sha256 (the bad download is not kept).
    """
    if path not in SEED_FILES:
        raise KeyError(f"{path!r} is not a pinned seed file (known: {', '.join(SEED_FILES)})")
    expected, _size = SEED_FILES[path]
    dest = Path(root).expanduser() if root is not None else cache_dir()
    dest = dest / path
    if dest.is_file() and _sha256(dest) == expected:
        return dest
    url = url or f"{base_url()}/{path}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and _sha256(dest) == expected:  # another process fetched it meanwhile
            return dest
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                _download(url, tmp, timeout)
            except urllib.error.HTTPError as err:
                raise FetchError(path, url, f"HTTP {err.code} {err.reason}", bundle_of(path)) from None
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", None) or err
                raise FetchError(path, url, f"cannot download ({reason}; offline?)", bundle_of(path)) from None
            got = _sha256(tmp)
            if got != expected:
                raise FetchError(path, url, f"checksum mismatch: sha256 {got}, expected {expected}",
                                 bundle_of(path))
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def fetch_bundle(name: str, root: Path | str | None = None) -> list[Path]:
    """Every file of bundle ``name`` (``real_world``, ``tofu``, ``idk``); see :func:`fetch_file`."""
    if name not in BUNDLES:
        raise KeyError(f"unknown seed bundle {name!r} (known: {', '.join(BUNDLES)})")
    return [fetch_file(p, root) for p in BUNDLES[name]]


def seed_dir(bundle: str = "real_world") -> Path:
    """The cached directory of a directory bundle (``real_world`` or ``tofu``), all files fetched."""
    files = fetch_bundle(bundle)
    return files[0].parent


def seed_file(name: str) -> Path:
    """One seed data file by its name under ``data/`` (``"idontknow.jsonl"``,
    ``"real_world/forget.json"``), fetched and checked; raises :class:`FetchError`."""
    return fetch_file(f"data/{name}")


def seed_splits(bundle: str) -> list[str]:
    """Split names (file stems) a directory bundle holds, without fetching anything."""
    return [Path(p).stem for p in BUNDLES[bundle]]
