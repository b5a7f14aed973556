"""GGUF files (llama.cpp's format) as a tensor source, read with the ``gguf`` package
(``pip install sepstore[gguf]``).

The tensor table is read first from the memory-mapped file; a tensor's bytes are read only when
it is asked for. :class:`GGUFFile` keys keep GGUF's own names (``token_embd.weight``,
``blk.3.attn_q.weight``, ``output.weight``) and layout (llama.cpp's converter permutes Llama's Q/K
projections for its RoPE); :mod:`sepstore.deciders.gguf` places them (a GGUF with no
``output.weight`` gets ``token_embd.weight`` as its head in end, as llama.cpp uses it). For the
architectures transformers reads the same way, :mod:`sepstore.convert.gguf_hf` shows the file under
Hugging Face names and layout instead, which is what ``convert`` uses unless asked for GGUF's
names. Tensors stored unquantized (F32, F16, BF16, F64 and the integer types) are returned as they
are: same dtype, same bits, with the shape in PyTorch order (GGUF lists dimensions innermost first;
they are reversed here). Quantized tensors (Q8_0, Q4_0, Q4_K, ...) are dequantized with
``gguf.quants.dequantize`` to float32, which ``convert``'s ``dtype`` then casts (``dtype="bf16"``);
with no ``dtype`` they stay float32.

GGUF files must be on local disk: a GGUF on another fsspec filesystem is a :class:`StoreError`
(download it first). Nothing is ever unpickled. The key/value table is walked (bounded) before
the gguf package parses it, which it does into a numpy view per value: a table far above what the
largest tokenizers hold is refused first.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ..errors import StoreError, TensorError
from ..safetensors_io import BufferTensor, RawTensor
from .source import TensorInfo

__all__ = ["GGUFFile"]


#: GGUF types stored as plain arrays (their names are safetensors' too; BF16 is handled apart).
_PLAIN = frozenset({"F32", "F16", "F64", "I8", "I16", "I32", "I64"})


#: Caps on the metadata gguf.GGUFReader parses before anything can be checked: it keeps a numpy view
#: of every value (0.7 KiB; two per string), so 8 MiB of empty strings took 1.5 GiB. No array may
#: hold more than twice the largest vocabulary (262,144 tokens; Llama 3 has 280,147 merges), ...
_MAX_ARRAY = 1 << 19
#: ... and the views in all (two per string, one per number, six per tensor) are at most about what
#: the largest tokenizers take (~1.5M views, ~1 GiB), as are the bytes of the key/value table.
_MAX_VIEWS = 1 << 21
_MAX_METADATA = 128 << 20
#: GGUF's value types (gguf.GGUFValueType) by their size; 8 is a string, 9 an array.
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _MetadataScan:
    """A bounded walk over a GGUF's header and key/value table, skipping every value, that refuses
    a table GGUFReader would blow up in memory (:data:`_MAX_ARRAY`, :data:`_MAX_VIEWS`,
    :data:`_MAX_METADATA`); a file that is not GGUF 2 or 3 is left for GGUFReader to refuse."""

    def __init__(self, buf: mmap.mmap, url: str) -> None:
        self.buf, self.url, self.pos, self.views = buf, url, 0, 0
        self.order = "<"

    def run(self) -> None:
        if self.buf[:4] != b"GGUF":
            return
        if self._take("I", 4) & 0xFFFF == 0:  # written big-endian (GGUFReader's test too)
            self.order = ">"
        if self._take("I", 4) not in (2, 3):
            return
        tensors, count = self._take("Q", 8), self._take("Q", 16)
        self.pos, self.views = 24, 6 * tensors
        self._check("its tensor table")
        for _ in range(count):
            length = self._take("Q")
            key = bytes(self.buf[self.pos : self.pos + min(length, 200)]).decode("utf-8", "replace")
            self.pos += length
            self._value(self._take("I"), key, depth=0)

    def _take(self, fmt: str, at: int | None = None) -> int:
        """The integer at ``at`` (default: at the position, which then moves past it)."""
        try:
            got: int = struct.unpack_from(self.order + fmt, self.buf, self.pos if at is None else at)[0]
        except struct.error:
            raise StoreError(f"{self.url}: not a GGUF file sepstore can read (its metadata ends early)") from None
        if at is None:
            self.pos += struct.calcsize(fmt)
        return got

    def _skip_string(self) -> None:
        length = self._take("Q")  # before reading self.pos, which taking moves
        self.pos += length

    def _value(self, kind: int, key: str, depth: int) -> None:
        if kind == _STRING:
            self._skip_string()
            self.views += 2
        elif kind in _SIZES:
            self.pos += _SIZES[kind]
            self.views += 1
        elif kind == _ARRAY:
            if depth == 4:
                raise StoreError(f"{self.url}: its metadata key {key!r} nests arrays more than 4 deep")
            item, count = self._take("I"), self._take("Q")
            self.views += 2
            if count > _MAX_ARRAY:
                raise StoreError(
                    f"{self.url}: its metadata array {key!r} holds {count} values, more than {_MAX_ARRAY} (twice the "
                    "largest vocabulary); refused before the gguf package reads it into memory"
                )
            if item in _SIZES:
                self.pos += count * _SIZES[item]
                self.views += count
            elif item == _STRING:
                for _ in range(count):
                    self._skip_string()
                self.views += 2 * count
            else:
                for _ in range(count):
                    self._value(item, key, depth + 1)
        else:
            raise StoreError(f"{self.url}: its metadata key {key!r} has a value of unknown type {kind}")
        self._check(f"its metadata key {key!r}")

    def _check(self, where: str) -> None:
        if self.pos > len(self.buf):
            raise StoreError(f"{self.url}: not a GGUF file sepstore can read ({where} runs past its end)")
        if self.views > _MAX_VIEWS or self.pos > _MAX_METADATA:
            raise StoreError(
                f"{self.url}: {where} takes the metadata past {_MAX_VIEWS} values or {_MAX_METADATA >> 20} MiB, "
                "more than the largest models' tokenizers; refused before the gguf package reads it into memory"
            )


def _check_metadata(path: str, url: str) -> None:
    """Refuse a GGUF whose metadata the gguf package would blow up in memory (:class:`_MetadataScan`)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                return  # no header: GGUFReader says so
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _MetadataScan(buf, url).run()
    except OSError as exc:
        raise StoreError(f"{url}: cannot read it ({type(exc).__name__}: {exc})") from exc


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise StoreError("reading GGUF files needs the gguf package: pip install 'sepstore[gguf]'") from None
    return gguf


class GGUFFile:
    """A local GGUF file: its tensor table read up front, each tensor read (and, if quantized,
    dequantized to float32) when asked for. ``config`` is a small HF-like config from the GGUF
    metadata (``model_type``, ``num_hidden_layers``, ``hidden_size``, ...)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
        self.url, self.path = url, path
        if not isinstance(fs, LocalFileSystem):
            raise StoreError(f"{url}: GGUF files are read from local disk only; download it first")
        gguf = _gguf()
        _check_metadata(path, url)
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, KeyError, IndexError, OSError) as exc:
            raise StoreError(f"{url}: not a GGUF file sepstore can read ({type(exc).__name__}: {exc})") from exc
        self._reader = reader
        self._swapped = reader.byte_order == "S"
        self._tensors: dict[str, Any] = {}
        self.index: dict[str, TensorInfo] = {}
        quantized: set[Any] = set()
        for tensor in reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            kind = tensor.tensor_type.name
            if kind in _PLAIN or kind == "BF16":
                dtype = kind
            else:
                dtype = "F32"
                quantized.add(tensor.tensor_type)
            self._tensors[tensor.name] = tensor
            self.index[tensor.name] = TensorInfo(dtype, shape)
        for qtype in sorted(quantized):
            self._check_dequantizes(gguf, qtype)
        self.architecture = self.value("general.architecture")
        self.config: dict[str, Any] | None = self._config()

    def _check_dequantizes(self, gguf: Any, qtype: Any) -> None:
        """Fail before any part is written if a quantization type cannot be read."""
        names = [name for name, t in self._tensors.items() if t.tensor_type == qtype]
        if self._swapped:
            raise TensorError(f"{self.url}: quantized tensors in a big-endian GGUF are not supported ({names[:3]})")
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            raise TensorError(
                f"{self.url}: the installed gguf package cannot dequantize {qtype.name} (tensors {names[:3]}); "
                "try a newer gguf"
            ) from None

    def has(self, key: str) -> bool:
        """Whether the metadata holds ``key`` (of any type)."""
        return key in self._reader.fields

    def value(self, key: str) -> Any:
        """A scalar metadata value (a float as the float32 written, without float64 noise), or None
        where the key is absent or holds an array."""
        field = self._reader.fields.get(key)
        if field is None or not field.types or len(field.types) != 1:
            return None
        try:
            got = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            return None
        if isinstance(got, float):
            return float(str(np.float32(got)))
        return got if isinstance(got, int | str | bool) else None

    def count(self, key: str) -> int | None:
        """How many items the metadata array ``key`` holds (None if there is none)."""
        field = self._reader.fields.get(key)
        return len(field.data) if field is not None and field.data and field.data != [-1] else None

    def read(self, key: str) -> RawTensor:
        tensor = self._tensors[key]
        info = self.index[key]
        kind = tensor.tensor_type.name
        data = tensor.data
        try:
            if kind in _PLAIN:
                array = np.array(data, dtype=data.dtype.newbyteorder("="))
            elif kind == "BF16":
                raw = data.reshape(-1).view(np.dtype(np.int16).newbyteorder(">" if self._swapped else "<"))
                array = raw.astype(np.int16)
            else:
                array = np.ascontiguousarray(_gguf().quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
        except (ValueError, IndexError) as exc:
            raise StoreError(f"{self.url}: cannot read tensor {key!r} ({type(exc).__name__}: {exc})") from exc
        return BufferTensor(info.dtype, info.shape, memoryview(np.ascontiguousarray(array)).cast("B"))

    def _config(self) -> dict[str, Any] | None:
        """What the GGUF metadata says of the model, under Hugging Face config names."""
        arch = self.architecture
        if not isinstance(arch, str):
            return None
        config: dict[str, Any] = {"model_type": arch}
        wanted = {
            "num_hidden_layers": f"{arch}.block_count",
            "hidden_size": f"{arch}.embedding_length",
            "intermediate_size": f"{arch}.feed_forward_length",
            "num_attention_heads": f"{arch}.attention.head_count",
            "num_key_value_heads": f"{arch}.attention.head_count_kv",
            "max_position_embeddings": f"{arch}.context_length",
            "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
            "rope_theta": f"{arch}.rope.freq_base",
            "vocab_size": f"{arch}.vocab_size",
        }
        for name, key in wanted.items():
            got = self.value(key)
            if got is not None and not isinstance(got, str):
                config[name] = got
        if "vocab_size" not in config and (tokens := self.count("tokenizer.ggml.tokens")) is not None:
            config["vocab_size"] = tokens
        return config

    def close(self) -> None:
        """Drop the memory map (tensors already read stay valid: they are copies)."""
        self._tensors.clear()
        self._reader = None
