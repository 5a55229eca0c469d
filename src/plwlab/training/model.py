"""Loading an HF causal LM and its tokenizer: pretrained (hub id or local directory) or randomly initialised from
a config, optionally with a LoRA adapter."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import init_empty_weights
from tokenizers import processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)  # fmt: skip
from transformers.convert_slow_tokenizer import import_protobuf
from transformers.tokenization_utils_base import generate_merges
from transformers.utils.hub import cached_file

from plwlab.data.chat import set_chat_template
from plwlab.data.tokenization import sentencepiece_normalizer
from plwlab.training.attention import resolve_attn_implementation


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded (bad path, offline hub, bad preset)."""


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    tokenizer: Any
    pretrained_vocab_size: int  # embedding rows before any added token: excluded from weight distances
    weights_sha256: str | None = None  # the pretrained weights' digest (weights_digest); None: built from a config


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.index.json")  # what from_pretrained reads weights from
SAMPLE_BLOCKS, BLOCK_BYTES = 16, 1 << 16  # per weight file: 16 blocks of 64 KiB, evenly spaced, plus its last one


def weights_digest(directory: str | Path) -> str:
    """A digest of the pretrained weights in ``directory`` that reads about 1 MiB per file, not the whole 13 GB:
    each weight file's name and size, its safetensors header (names, dtypes, shapes, offsets) and
    :data:`SAMPLE_BLOCKS` blocks of it spread evenly over the file. Equal for a copy of the folder anywhere; a
    replaced or re-trained model (same shapes, other values) differs in every block, so its digest differs. A
    single edited weight may not be seen: this guards against another model, not against tampering."""
    digest = hashlib.sha256()
    files = sorted({f for pattern in WEIGHT_FILES for f in Path(directory).glob(pattern)})
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            if file.suffix == ".safetensors" and size >= 8:
                header = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header, size - 8)))
            offsets = {min(size - 1, i * size // SAMPLE_BLOCKS) for i in range(SAMPLE_BLOCKS)} | {max(size - BLOCK_BYTES, 0)}
            for offset in sorted(offsets):
                f.seek(offset)
                digest.update(f.read(BLOCK_BYTES))
    return digest.hexdigest()[:16]


def model_directory(name_or_path: str) -> Path:
    """The local folder holding a pretrained model: ``name_or_path`` itself, or a hub id's snapshot in the HF cache
    (offline: the one ``from_pretrained`` just read)."""
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else Path(cached_file(name_or_path, "config.json")).parent


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id (``owner/name``): absolute, relative with ./ or ../, home-relative, or existing."""
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).expanduser().exists()


def _check_local_dir(name_or_path: str, what: str, marker: str) -> None:
    """A one-line error for a local model or tokenizer directory that is missing or holds no ``marker`` file."""
    path = Path(name_or_path).expanduser()
    if not _looks_local(name_or_path) or path.is_file():
        return
    if not path.exists():
        raise ModelLoadError(f"{what} {'file' if path.suffix else 'directory'} {name_or_path} does not exist")
    if not any(path.glob(marker)):
        raise ModelLoadError(f"{what} directory {name_or_path} has no {marker} (not a HF {what} folder?)")


def sentencepiece_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to SentencePiece on a bare BPE ``tokenizer.model`` (LLaMA's), adding BOS as LLaMA
    expects; it saves as a ``tokenizer.json`` that reloads unchanged (``AutoTokenizer``).

    transformers 5 builds a bare ``.model`` differently in two ways, both fixed here. It ranks the BPE merges by
    token id, which puts ``("▁", "▁")`` (id 259, the lowest SentencePiece score) first: ``"words:  vegetable"``
    gives ``▁▁ ve get able`` instead of SentencePiece's ``▁ ▁veget able``; here merges are ranked by piece score.
    And its Metaspace pre-tokenizer prepends "▁" only to a text that does not start with a space (``" x"`` gives
    ``▁x``, SentencePiece ``▁ ▁x``); here SentencePiece's dummy prefix is always prepended (the legacy LLaMA
    ``tokenizer.json`` normalizer).
    """
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if not (spec.model_type == 2 and spec.byte_fallback and norm.name == "identity" and norm.add_dummy_prefix
            and not norm.remove_extra_whitespaces):  # fmt: skip
        raise ModelLoadError(f"{path}: only a byte-fallback BPE SentencePiece model with identity normalization (LLaMA's) "
                             "can be loaded from a bare .model; pass a HF tokenizer directory instead")  # fmt: skip
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    backend = LlamaTokenizer(vocab=vocab, merges=merges)._tokenizer  # byte-fallback BPE + SentencePiece's decoder
    backend.normalizer = sentencepiece_normalizer()
    backend.pre_tokenizer = None
    bos, eos, unk = (proto.pieces[i].piece for i in (spec.bos_id, spec.eos_id, spec.unk_id))
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, spec.bos_id)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk)


def load_tokenizer(tokenizer: str) -> Any:
    """A tokenizer from a hub id, a local directory, or a bare SentencePiece ``.model`` file (LLaMA)."""
    path = Path(tokenizer).expanduser()
    _check_local_dir(tokenizer, "tokenizer", "tokenizer*")
    try:
        if path.is_file() and path.suffix == ".model":
            return sentencepiece_tokenizer(path)
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else tokenizer)
    except (OSError, ValueError) as e:
        hint = ""
        if not path.exists() and "huggingface.co" in str(e):  # a hub id on a machine that cannot (or may not) reach it
            hint = (" (offline: set model.tokenizer to a local tokenizer folder or SentencePiece .model file, e.g. "
                    "model.tokenizer=/data/llama/tokenizer.model)")  # fmt: skip
        raise ModelLoadError(f"cannot load tokenizer {tokenizer!r}: {str(e).splitlines()[0]}{hint}") from e


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: instances of the classes HF lists in ``_no_split_modules`` (LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} lists no decoder-layer class in _no_split_modules: cannot shard or compile it per layer")
    return layers


def load_model(
    name: str,
    tokenizer: str,
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    add_pad_token: bool = False,
    attn_implementation: str | None = "auto",
    gradient_checkpointing: bool = False,
    compile: bool = False,
    lora: dict[str, Any] | None = None,
    chat_template: str | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load a pretrained causal LM (``name_or_path``: hub id or local dir) or build a randomly initialised one
    from ``config`` (kwargs of ``AutoConfig.for_model``, e.g. ``model_type: llama``), plus its tokenizer.

    A tokenizer without a pad token gets ``[PAD]`` added (embeddings resized, as Stanford Alpaca does) when
    ``add_pad_token``, else reuses its unk/eos token (padding never enters the loss). ``lora`` holds
    ``peft.LoraConfig`` kwargs to train a LoRA adapter instead of all weights. ``chat_template`` (chat data on a
    tokenizer without one, or to replace it): ``chatml`` (adds its two tokens, as TRL's ``setup_chat_format``), a
    ``.jinja`` file or a template string (:func:`plwlab.data.chat.set_chat_template`). ``attn_implementation``:
    ``auto`` (varlen flash on CUDA, else SDPA: :mod:`plwlab.training.attention`), ``varlen``, ``sdpa``, ``eager``,
    ``flash_attention_2``..., or None for the model's own default. ``compile``: ``torch.compile`` each decoder
    layer (compiled at its first call; inductor needs a C compiler on CPU). ``gradient_checkpointing`` ``auto``
    is decided by :func:`plwlab.training.memory.preflight` (its plan) before this; here it counts as on.

    ``weights=False`` (the ranks other than 0 of a sharded run, see :func:`plwlab.training.sharding.shard_model`):
    the pretrained model's architecture only, its parameters on the meta device (no memory, nothing read), its
    buffers (e.g. rotary frequencies) real; rank 0's weights are broadcast into the shards once sharded.
    """
    if (name_or_path is None) == (config is None):
        raise ModelLoadError(f"model preset {name!r}: set exactly one of name_or_path (pretrained) or config (random init)")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelLoadError(f"model preset {name!r}: unknown dtype {dtype!r}")
    if name_or_path is not None:
        _check_local_dir(name_or_path, "model", "config.json")
    tok = load_tokenizer(tokenizer)
    if chat_template:
        set_chat_template(tok, chat_template)
    if tok.pad_token is None:
        if add_pad_token:
            tok.add_special_tokens({"pad_token": "[PAD]"})
        else:
            tok.pad_token = tok.unk_token or tok.eos_token
    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": resolve_attn_implementation(attn_implementation)}
    if name_or_path is not None:
        try:
            if weights:
                # from_pretrained returns the model in eval mode, and Lightning keeps the mode it finds ("Found 397
                # module(s) in eval mode", dropout off): train it in train mode, as the HF Trainer does
                model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).train()
            else:
                with init_empty_weights(include_buffers=False):
                    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path), **kwargs)
                # accelerate re-creates every parameter it moves to meta, so tied embeddings came apart: tie them
                # again, as rank 0's loaded model is (SmolLM2, Gemma); else the ranks' FSDP units differ
                model.tie_weights()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    else:
        special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model_config = AutoConfig.for_model(**{"vocab_size": len(tok), **special, **config})
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    pretrained_vocab_size = model.get_input_embeddings().weight.shape[0]
    if len(tok) > pretrained_vocab_size:  # on meta parameters: shapes only (rank 0's values are broadcast)
        model.resize_token_embeddings(len(tok), mean_resizing=weights)
    if gradient_checkpointing:  # per decoder layer; non-reentrant, as FSDP2 needs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:  # each decoder layer on its own (torchtitan's choice): small graphs, FSDP2 units unchanged
        for layer in decoder_layers(model):
            layer.compile()
    if lora:
        import peft  # only LoRA runs pay for importing peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    digest = None if name_or_path is None else weights_digest(model_directory(name_or_path))
    return LoadedModel(model, tok, pretrained_vocab_size, digest)
