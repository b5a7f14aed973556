"""A llama-family GGUF under Hugging Face transformers' names and layout, as transformers' own GGUF
loader (``transformers.modeling_gguf_pytorch_utils``) reads it.

For the GGUF architectures in :data:`ARCHITECTURES` (``llama``, which llama.cpp also uses for
Mistral, and ``qwen2``), every tensor gets its checkpoint name (``blk.3.attn_q.weight`` ->
``model.layers.3.self_attn.q_proj.weight``, ``token_embd.weight`` -> ``model.embed_tokens.weight``,
``output.weight`` -> ``lm_head.weight``, ...) and the Q/K rows llama.cpp's converter permutes for
its RoPE are put back in Hugging Face's order with transformers' own ``reverse_permute`` math: a
reordering of whole rows, so F32, F16 and BF16 tensors keep their exact bits. The metadata becomes
an HF ``config.json`` (``LlamaForCausalLM``/``Qwen2ForCausalLM``) with the values transformers
derives from the same file, plus ``architectures`` and ``torch_dtype``. The store is then what
converting the equivalent Hugging Face checkpoint with the llama family gives.

Where this differs from transformers, on purpose: a tensor with no Hugging Face name is an error
(transformers skips it); the one exception is llama 3's ``rope_freqs.weight``, which transformers
drops too (its rope scaling is not rebuilt, by either). A file without
``attention.head_count_kv`` has as many KV heads as query heads (llama.cpp's default; transformers
then leaves Q/K permuted); a count that is not one positive integer (a float, a per-layer array) is
refused, as are ``blk.N`` tensors that are not blocks 0 to ``block_count - 1``, each spelled once
(``blk.0``, never ``blk.00``). Floats are the float32 the file holds written shortest (``1e-05``, not
``9.999999747378752e-06``): the same float32 in the model.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..errors import DeciderError, StoreError, TensorError
from ..safetensors_io import BufferTensor, RawTensor
from .gguf import GGUFFile
from .source import TensorInfo

__all__ = ["ARCHITECTURES", "HFArchitecture", "TransformersView", "hf_name", "tokenizer_files"]


@dataclass(frozen=True)
class HFArchitecture:
    """How transformers reads one GGUF architecture."""

    model_type: str
    architecture: str
    #: Whether llama.cpp permuted the Q/K rows (transformers' ``LlamaTensorProcessor``).
    permuted: bool
    #: Whether transformers takes ``rope.dimension_count`` as ``head_dim``.
    head_dim: bool


ARCHITECTURES: Final = {
    "llama": HFArchitecture("llama", "LlamaForCausalLM", permuted=True, head_dim=True),
    "qwen2": HFArchitecture("qwen2", "Qwen2ForCausalLM", permuted=False, head_dim=False),
}

_TOP: Final = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_PARTS: Final = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
#: Tensors transformers leaves out of the model (it computes them from the config).
_DROPPED: Final = frozenset({"rope_freqs.weight"})
#: One spelling per layer (``blk.0``, never ``blk.00``), ASCII digits only: two GGUF names never
#: share a Hugging Face name.
_NAME = re.compile(r"(?:blk\.(0|[1-9][0-9]*)\.)?(\w+)\.(weight|bias)", re.ASCII)
#: Config values that count something: a positive integer (a float, an array of per-layer values
#: or zero is refused, not left to a default).
_COUNTS: Final = frozenset(
    {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"}
    | {"max_position_embeddings", "vocab_size", "head_dim"}
)
#: What a config cannot do without: LlamaConfig's defaults are one checkpoint's, never this file's.
_REQUIRED: Final = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
#: Token ids transformers copies from the tokenizer metadata into the config.
_TOKEN_IDS: Final = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unk_token_id": "unknown_token_id",
    "pad_token_id": "padding_token_id",
}
_TORCH_DTYPES: Final = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def hf_name(key: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, None for one transformers drops; anything else
    is a :class:`DeciderError` naming it."""
    if key in _DROPPED:
        return None
    match = _NAME.fullmatch(key)
    if match:
        layer, base, kind = match.groups()
        if layer is None and base in _TOP:
            return f"{_TOP[base]}.{kind}"
        if layer is not None and base in _LAYER_PARTS:
            return f"model.layers.{int(layer)}.{_LAYER_PARTS[base]}.{kind}"
    raise DeciderError(
        f"GGUF tensor {key!r} has no Hugging Face name in the llama family; convert with --gguf-names "
        "(gguf_names=True) to keep llama.cpp's names"
    )


class TransformersView:
    """A :class:`GGUFFile` of an architecture in :data:`ARCHITECTURES`, as a tensor source keyed by
    Hugging Face names, Q/K rows in Hugging Face's order; ``config`` is its HF ``config.json``."""

    def __init__(self, file: GGUFFile) -> None:
        self.file, self.url = file, file.url
        self.arch = ARCHITECTURES[str(file.architecture)]
        names = {key: hf_name(key) for key in file.index}
        self._source = {hf: key for key, hf in names.items() if hf is not None}
        self.index: dict[str, TensorInfo] = {hf: file.index[key] for hf, key in self._source.items()}
        self.config = self._config()
        self._check_layers()
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        self._heads = {".attn_q.": heads, ".attn_k.": kv_heads} if self.arch.permuted else {}

    def read(self, key: str) -> RawTensor:
        source = self._source[key]
        tensor = self.file.read(source)
        heads = next((n for part, n in self._heads.items() if part in source), None)
        return tensor if heads is None else _reverse_permute(tensor, heads, f"{self.url}: tensor {source!r}")

    def close(self) -> None:
        self.file.close()

    def _config(self) -> dict[str, Any]:
        """The HF config transformers derives from the metadata (``load_gguf_checkpoint``), with
        ``architectures`` and ``torch_dtype`` (the embedding's dtype as stored) added."""
        file, prefix = self.file, f"{self.file.architecture}."
        wanted = {
            "hidden_size": "embedding_length",
            "intermediate_size": "feed_forward_length",
            "num_hidden_layers": "block_count",
            "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv",
            "max_position_embeddings": "context_length",
            "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "rope_theta": "rope.freq_base",
            "vocab_size": "vocab_size",
        }
        if self.arch.head_dim:
            wanted["head_dim"] = "rope.dimension_count"
        config: dict[str, Any] = {"architectures": [self.arch.architecture], "model_type": self.arch.model_type}
        for name, key in wanted.items():
            if file.has(prefix + key):
                config[name] = self._number(prefix + key, count=name in _COUNTS)
        for name, key in _TOKEN_IDS.items():
            token = file.value(f"tokenizer.ggml.{key}")
            if isinstance(token, int) and not isinstance(token, bool):
                config[name] = token
        missing = [prefix + wanted[name] for name in _REQUIRED if name not in config]
        if missing:
            raise TensorError(
                f"{self.url}: its metadata lacks {', '.join(missing)}, which a Hugging "
                "Face config needs; convert with --gguf-names (gguf_names=True) to keep llama.cpp's names"
            )
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        if self.arch.model_type == "llama":  # llama's biases are off unless the config says (transformers drops them)
            biases = [key for key in self.index if key.endswith(".bias")]
            if any(".self_attn." in key for key in biases):
                config["attention_bias"] = True
            if any(".mlp." in key for key in biases):
                config["mlp_bias"] = True
        if "vocab_size" not in config and (tokens := file.count("tokenizer.ggml.tokens")) is not None:
            config["vocab_size"] = tokens
        config["tie_word_embeddings"] = "lm_head.weight" not in self._source
        embed = self.index.get("model.embed_tokens.weight")
        if embed is not None and embed.dtype in _TORCH_DTYPES:
            config["torch_dtype"] = _TORCH_DTYPES[embed.dtype]
        return dict(sorted(config.items()))

    def _number(self, key: str, count: bool) -> int | float:
        """The metadata number ``key``, a positive integer where it is a ``count``."""
        got = self.file.value(key)
        integer = isinstance(got, int) and not isinstance(got, bool)
        if (integer and got > 0) or (not count and (integer or isinstance(got, float))):
            return got
        shown = "an array (per-layer values) or unreadable" if got is None else repr(got)
        raise TensorError(
            f"{self.url}: its metadata's {key} is {shown}, not a {'positive integer' if count else 'number'}, "
            "which a Hugging Face config needs; convert with --gguf-names (gguf_names=True) to keep llama.cpp's names"
        )

    def _check_layers(self) -> None:
        """The ``blk.N`` tensors are blocks 0 to ``block_count - 1``, every one: a layer the file lacks
        would be a gap in the store, a count above the blocks a model that skips some."""
        count = self.config["num_hidden_layers"]
        found = sorted({int(key.split(".")[2]) for key in self.index if key.startswith("model.layers.")})
        if found != list(range(count)):
            shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
            raise TensorError(
                f"{self.url}: its metadata's {self.file.architecture}.block_count is {count} but its tensors "
                f"hold blocks [{shown}]; a GGUF's blk.N tensors must be blocks 0 to {count - 1}"
            )


def _reverse_permute(tensor: RawTensor, n_head: int, where: str) -> RawTensor:
    """transformers' ``LlamaTensorProcessor._reverse_permute_weights``, on whole rows of bytes:
    rows ``(head, pair, half)`` back to ``(head, half, pair)``."""
    if tensor.shape and not tensor.nbytes:
        return tensor
    if not tensor.shape or tensor.shape[0] % (2 * n_head):
        raise TensorError(f"{where}: shape {tensor.shape} does not split into {n_head} heads of two halves of rows")
    data = np.frombuffer(tensor.read(), dtype=np.uint8).reshape(n_head, tensor.shape[0] // n_head // 2, 2, -1)
    return BufferTensor(tensor.dtype, tensor.shape, np.ascontiguousarray(data.swapaxes(2, 1)).reshape(-1))


def tokenizer_files(file: GGUFFile) -> dict[str, bytes]:
    """The files transformers writes for the tokenizer the GGUF embeds (``tokenizer.json``,
    ``tokenizer_config.json``, a chat template, ...: ``AutoTokenizer.from_pretrained(folder,
    gguf_file=...)`` then ``save_pretrained``), and ``generation_config.json`` from the config it
    derives; none if the file has no ``tokenizer.ggml.model``. Only the metadata is read."""
    if file.value("tokenizer.ggml.model") is None:
        return {}
    try:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    except ImportError:
        raise StoreError(
            f"{file.url}: storing the tokenizer a GGUF embeds needs transformers: pip install 'sepstore[gguf]', "
            "or convert without assets (--no-assets, assets=False)"
        ) from None
    with tempfile.TemporaryDirectory(prefix="sepstore-gguf-") as folder:
        # alone in a folder: files beside the GGUF (an HF repo's tokenizer_config.json) are not read into it
        os.symlink(os.path.abspath(file.path), os.path.join(folder, "model.gguf"))
        saved = os.path.join(folder, "saved")
        try:
            AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf").save_pretrained(saved)
            config = AutoConfig.from_pretrained(folder, gguf_file="model.gguf")
            generation = GenerationConfig.from_model_config(config)
            if generation.bos_token_id is not None or generation.eos_token_id is not None:
                generation.save_pretrained(saved)
        except Exception as exc:  # whatever transformers' tokenizer code raises on metadata it does not expect
            raise StoreError(
                f"{file.url}: transformers cannot rebuild the tokenizer this GGUF embeds ({type(exc).__name__}: "
                f"{exc}); convert without assets (--no-assets, assets=False)"
            ) from exc
        out: dict[str, bytes] = {}
        for name in sorted(os.listdir(saved)):
            with open(os.path.join(saved, name), "rb") as f:
                out[name] = f.read()
        return out
