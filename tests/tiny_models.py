"""Tiny random models for tests, saved the way real ones are and loaded through the same code.

Everything here runs on the CPU in well under a second and needs no network::

    from tests.tiny_models import make_tiny_pair

    target_dir, draft_dir = make_tiny_pair(tmp_path)             # draft = exact copy
    target_dir, draft_dir = make_tiny_pair(tmp_path, same=False)  # draft = other random weights
    pair = load_pair(str(target_dir), str(draft_dir), device="cpu")

Each folder holds a ``Qwen2ForCausalLM`` (2 layers, hidden size 32, float32 weights) and a
byte-level BPE tokenizer trained on a few lines of code, with a ChatML-style chat template,
``<|im_end|>`` as eos and ``<|endoftext|>`` as padding. The tokenizer never has more ids than
the model's vocabulary, so any text it encodes is a valid model input. The same arguments give
the same weights and the same tokenizer every time.

:func:`write_tiny_gguf` writes such a model as an (unquantized, float32) GGUF file that
transformers loads back bit for bit, for tests of the GGUF conversion path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
"""Special tokens, in id order: they get ids 0, 1 and 2."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MIN_VOCAB = 272
"""Smallest model vocabulary the helpers accept (256 bytes, 3 specials and some merges)."""

_CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "if value is None:\n    raise ValueError('value is required')\n",
)


def make_tiny_tokenizer(max_vocab: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with at most ``max_vocab`` ids, a chat template and an eos."""
    if max_vocab < MIN_VOCAB:
        raise ValueError(f"max_vocab must be at least {MIN_VOCAB}, got {max_vocab}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    assert len(tokenizer) <= max_vocab
    return tokenizer


def make_tiny_model(
    folder: Path,
    *,
    vocab: int = 320,
    ctx: int = 128,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    tokenizer: PreTrainedTokenizerFast | None = None,
    sliding_window: int | None = None,
    full_layers: int = 0,
) -> Path:
    """Save a random ``Qwen2ForCausalLM`` and a tokenizer into ``folder``; return ``folder``.

    ``vocab`` is the number of rows of the embedding matrix and ``ctx`` the context window
    (``max_position_embeddings``). ``hidden`` must be a multiple of 8 (4 heads, 2 kv heads).
    With ``sliding_window`` the layers after the first ``full_layers`` attend to that many
    positions only.
    """
    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB}, got {vocab}")
    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer(vocab)
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the model only {vocab}")
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ctx,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({} if sliding_window is None else {
            "use_sliding_window": True, "sliding_window": sliding_window,
            "max_window_layers": full_layers}),
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_pair(
    tmp_path: Path,
    *,
    same: bool = True,
    vocab: int = 320,
    ctx: int = 128,
    seed: int = 0,
    draft_vocab: int | None = None,
) -> tuple[Path, Path]:
    """Save a tiny target and draft under ``tmp_path``; return ``(target_dir, draft_dir)``.

    ``same=True``: the draft is a byte-for-byte copy of the target (every draft token is
    accepted). ``same=False``: the draft has the same shape and tokenizer but weights drawn
    with another seed (almost nothing is accepted). ``draft_vocab`` gives the draft a
    different vocabulary size, for tests of mismatched pairs.
    """
    tokenizer = make_tiny_tokenizer(min(vocab, draft_vocab or vocab))
    target_dir = make_tiny_model(
        tmp_path / "target", vocab=vocab, ctx=ctx, seed=seed, tokenizer=tokenizer
    )
    draft_dir = tmp_path / "draft"
    if same and draft_vocab is None:
        shutil.copytree(target_dir, draft_dir)
    else:
        make_tiny_model(
            draft_dir,
            vocab=draft_vocab or vocab,
            ctx=ctx,
            seed=seed if same else seed + 1,
            tokenizer=tokenizer,
        )
    return target_dir, draft_dir


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write the tiny model saved in ``model_dir`` as a float32 GGUF file at ``path``.

    The file carries the architecture, the weights, the tokenizer (vocabulary, merges, special
    tokens) and the chat template, as llama.cpp's converter would write them; transformers
    loads the same weights back exactly. Only the models :func:`make_tiny_model` makes are
    supported.
    """
    import gguf

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    config = model.config
    layers = config.num_hidden_layers
    writer = gguf.GGUFWriter(path, arch="qwen2")
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    rope: Any = config.rope_parameters
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in by_id]
    assert [index for _, index in by_id] == list(range(len(tokens)))
    padding = [f"<|extra_{i}|>" for i in range(config.vocab_size - len(tokens))]
    types = [
        gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL
        for token in tokens
    ] + [gguf.TokenType.USER_DEFINED] * len(padding)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens + padding)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    for hf_name, tensor in model.state_dict().items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
