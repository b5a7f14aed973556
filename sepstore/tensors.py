"""The bridge between torch tensors and part files: dtype names, raw bytes, and back.

Only the code paths that hold torch tensors import this module (and so torch): writing a
state dict, reading parts into tensors, casting with ``convert``'s ``dtype``. Converting a
safetensors checkpoint as it is never imports torch.
"""

from __future__ import annotations

import torch

from .errors import TensorError
from .safetensors_io import BufferTensor, RawTensor

__all__ = ["DTYPES", "as_raw", "cast", "dtype_name", "raw_bytes", "to_torch"]

#: safetensors dtype name -> torch dtype, for every dtype safetensors' torch API knows.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; a ``TypeError`` for dtypes safetensors lacks."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(f"safetensors cannot store tensors of dtype {dtype}") from None


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def as_raw(value: object, key: str) -> RawTensor:
    """A state-dict value as the bytes a part stores; a :class:`TensorError` naming ``key`` for
    anything that is not a dense tensor of a dtype safetensors has."""
    if not isinstance(value, torch.Tensor):
        raise TensorError(f"state-dict key {key!r} holds a {type(value).__name__}, not a tensor")
    try:
        name = dtype_name(value.dtype)
    except TypeError as exc:
        raise TensorError(f"state-dict key {key!r}: {exc}") from None
    if value.layout != torch.strided or value.is_meta or value.is_nested:
        kind = "meta" if value.is_meta else "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise TensorError(f"state-dict key {key!r} is a {kind} tensor; only dense tensors with data can be stored")
    return BufferTensor(name, tuple(value.shape), raw_bytes(value))


def to_torch(raw: RawTensor) -> torch.Tensor:
    """A raw tensor as a torch tensor over the same bytes (read first if they are in a file)."""
    data = raw.read()
    flat = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return flat.view(DTYPES[raw.dtype]).reshape(raw.shape)


def cast(raw: RawTensor, dtype: str) -> RawTensor:
    """``raw`` converted to the dtype named ``dtype`` (as ``Tensor.to`` rounds)."""
    if raw.dtype == dtype:
        return raw
    return as_raw(to_torch(raw).to(DTYPES[dtype]), "")
