"""Read data-set pickles without letting them run code.

CIFAR-100's ``train``/``test``/``meta``, Ren et al.'s tieredImageNet caches and the mini-ImageNet
caches are pickles of plain data: dicts, lists and tuples of strings, bytes and numbers, and NumPy
arrays. ``pickle.load`` would also call any importable function a file names, so a tampered file
runs code on load. ``load`` admits only the globals such files need to rebuild their data (the
approach of the ``pickle`` documentation's "Restricting Globals"), each wrapped so that it can only
build what its name promises; any other global is refused in one line naming it:

    numpy ``_reconstruct``/``_frombuffer``/``scalar``/``dtype`` (arrays and scalars of plain dtypes,
    never object arrays), ``_codecs.encode`` with latin-1 only (how Python 3 writes bytes at protocol
    2), ``set``/``frozenset`` and ``collections.OrderedDict``.

Python 2 strings (the official CIFAR-100 files were written by ``cPickle``) are read as bytes.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from pipelines.dataset import DatasetError

_numpy_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever it lives


class _Refused(pickle.UnpicklingError):
    """A global (or persistent id) the file asked for that ``load`` does not admit."""


class _ArrayType:
    """Stands in for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may be given it (calling
    ``ndarray(shape)`` directly would allocate whatever a file asks for)."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _ArrayType:
        raise _Refused(f"numpy _reconstruct of {subtype!r}")
    return _numpy_reconstruct(np.ndarray, shape, _plain_dtype(dtype))


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    dtype = _plain_dtype(dtype)
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order=order if order in ("C", "F") else "C")


def _scalar(dtype: Any, data: bytes = b"") -> Any:
    dtype = _plain_dtype(dtype)
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _plain_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = spec if isinstance(spec, np.dtype) else np.dtype(
        spec.decode("latin-1") if isinstance(spec, bytes) else spec, align, copy)
    if dtype.hasobject:
        raise _Refused("a NumPy array of Python objects (dtype object)")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding.lower().replace("_", "-") not in ("latin-1", "latin1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


# (module, name) as written in the file -> what it may build. NumPy moved ``numpy.core`` to
# ``numpy._core`` in 2.0; Python 2 pickles name ``__builtin__``.
_ADMITTED: dict[tuple[str, str], Callable[..., Any] | type] = {
    **{(module, "_reconstruct"): _reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _ArrayType,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): OrderedDict,
    **{(module, name): kind for module in ("builtins", "__builtin__")
       for name, kind in (("set", set), ("frozenset", frozenset))},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent object id")


def load(source: str | Path | bytes | IO[bytes], *, name: str | None = None) -> Any:
    """The data in a pickle file (a path, its bytes or an open binary file), built only from plain
    containers, strings, bytes, numbers and NumPy arrays; ``DatasetError`` naming ``name`` (the
    file as users know it) for anything else or a damaged file."""
    label = name or str(source)
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                return _RestrictedUnpickler(handle, encoding="bytes").load()
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        return _RestrictedUnpickler(handle, encoding="bytes").load()
    except _Refused as refused:
        raise DatasetError(f"{label}: the pickle asks for {refused}, which orch does not load "
                           "(it admits only containers, strings, numbers and NumPy arrays); "
                           "refusing the file") from None
    except OSError as error:
        raise DatasetError(f"{label}: cannot read ({error.strerror or error})") from None
    except Exception as error:  # a damaged pickle raises almost anything (EOFError, ValueError...)
        raise DatasetError(f"{label}: unreadable pickle ({type(error).__name__}: "
                           f"{_first_line(error)})") from None


def key(data: dict[Any, Any], name: str) -> Any:
    """``data[name]`` for a dict pickled by Python 3 (str keys) or read from Python 2 (bytes keys)."""
    if name in data:
        return data[name]
    return data[name.encode()]


def has_keys(data: Any, *names: str) -> bool:
    return isinstance(data, dict) and all(n in data or n.encode() in data for n in names)


def text(value: Any) -> str:
    """A Python 2 string (bytes here) or a Python 3 one, as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no detail"

