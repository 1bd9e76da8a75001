"""The embedded default model: a small Llama with random weights, made locally.

Its text is noise (the weights are random), but it has the shape, tokenizer and chat
template of a real model, so every code path of the runtime runs on it for real.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import attrs
import cattrs
import numpy as np

logger = logging.getLogger("troupe")

EmbeddedSize = Literal["tiny", "small"]

# Bumped whenever the recipe below changes, so cached copies are remade.
RECIPE_VERSION = 3
SEED = 20261121

SPECIAL_TOKENS = ("<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<pad>")
BOS, EOS = "<s>", "<|end|>"

# With ``tools``, a Hermes/Qwen-style preamble lists them as JSON and asks for calls as
# ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (mlx-lm then picks its JSON
# tool parser for this template); without, the transcript renders as it always did.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "To call a tool, answer with one <tool_call>\n"
    '{"name": <tool_call.name>, "arguments": <tool_call.arguments>}\n'
    "</tool_call> per call.<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@attrs.frozen
class EmbeddedShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int


SHAPES: dict[str, EmbeddedShape] = {
    "tiny": EmbeddedShape(256, 4, 4, 2, 512, 2048),
    "small": EmbeddedShape(512, 8, 8, 4, 1408, 4096),
}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte value, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _speakable_bytes() -> np.ndarray:
    """Bytes the random model may emit: printable ASCII and newline.

    Steering output into ASCII keeps every reply valid UTF-8, so a reply re-tokenizes to the
    very tokens that were generated, as it does with a real model's ordinary text.
    """
    mask = np.zeros(256, dtype=bool)
    mask[0x20:0x7F] = True
    mask[ord("\n")] = True
    return mask


def _write_tokenizer(directory: Path, context: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": "<pad>",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": "<pad>"}, indent=2)
    )


def _weights(shape: EmbeddedShape, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic random fp32 Llama weights.

    Channel 0 of the residual stream holds a constant (set by the embedding, written by no
    layer), and the output head reads it with a large positive weight for speakable tokens
    and a large negative one for the rest: a fixed logit bias built from plain Llama weights.
    Queries and keys are scaled up so attention is sharp: greedy replies then depend on the
    context instead of settling into one repeated character.
    """
    rng = np.random.default_rng(seed)
    d = shape.hidden_size
    head_dim = d // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    inter = shape.intermediate_size

    def normal(*dims: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    embed = normal(vocab_size, d, scale=1.0)
    embed[:, 0] = 6.0
    w["model.embed_tokens.weight"] = embed
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(d, d, scale=3 * d**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal(kv, d, scale=3 * d**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal(kv, d, scale=d**-0.5)
        o_proj = normal(d, d, scale=d**-0.5)
        o_proj[0, :] = 0.0
        w[p + "self_attn.o_proj.weight"] = o_proj
        w[p + "mlp.gate_proj.weight"] = normal(inter, d, scale=d**-0.5)
        w[p + "mlp.up_proj.weight"] = normal(inter, d, scale=d**-0.5)
        down = normal(d, inter, scale=inter**-0.5)
        down[0, :] = 0.0
        w[p + "mlp.down_proj.weight"] = down
        w[p + "input_layernorm.weight"] = np.ones(d, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, dtype=np.float32)
    w["model.norm.weight"] = np.ones(d, dtype=np.float32)
    head = normal(vocab_size, d, scale=0.15)
    bias = np.full(vocab_size, -6.0, dtype=np.float32)
    bias[:256][_speakable_bytes()] = 6.0
    # The end-of-turn token sits a little below speech, so replies end now and then.
    bias[256 + SPECIAL_TOKENS.index(EOS)] = 4.8
    head[:, 0] = bias
    w["lm_head.weight"] = head
    return w


def make_model(directory: str | os.PathLike[str], size: EmbeddedSize = "tiny") -> Path:
    """Write the embedded model of ``size`` into ``directory`` (made if missing).

    The result is an ordinary MLX model directory (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json) that ``mlx_lm.load`` accepts. Same size, same
    bytes: the weights come from a fixed seed. A ``directory`` that exists as a file raises
    ``NotADirectoryError``.
    """
    if size not in SHAPES:
        raise ValueError(f"size must be one of {sorted(SHAPES)}, got {size!r}")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    import mlx.core as mx

    shape = SHAPES[size]
    target.mkdir(parents=True, exist_ok=True)
    vocab_size = 256 + len(SPECIAL_TOKENS)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 256 + SPECIAL_TOKENS.index(BOS),
        "eos_token_id": 256 + SPECIAL_TOKENS.index(EOS),
        "torch_dtype": "float32",
        "troupe_embedded": {"size": size, "recipe": RECIPE_VERSION, "seed": SEED},
        **cattrs.unstructure(shape),
    }
    weights = _weights(shape, vocab_size, SEED)
    mx.save_safetensors(
        str(target / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}
    )
    _write_tokenizer(target, shape.max_position_embeddings)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def cache_root() -> Path:
    """Where troupe keeps the embedded models it made ($TROUPE_CACHE_DIR overrides)."""
    explicit = os.environ.get("TROUPE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "troupe"


def embedded_model_path(size: EmbeddedSize = "small") -> Path:
    """The cached embedded model of ``size``, made on first use."""
    final = cache_root() / "models" / f"embedded-{size}-r{RECIPE_VERSION}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("making the embedded %s model in %s (once)", size, final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        make_model(staging, size)
        try:
            staging.rename(final)
        except OSError:
            # Another process made it first; theirs is byte-identical.
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
