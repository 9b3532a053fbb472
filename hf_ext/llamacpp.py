"""llama.cpp, built from a pinned source and driven from Python: convert a saved Hugging Face folder to GGUF
with llama.cpp's own converter, then measure it with llama.cpp's own tools (perplexity, KV cache size,
generation speed). This is how an exported model is checked in the engine people serve it with.

The source is the ``llama-cpp-python==0.3.36`` sdist from PyPI, whose ``vendor/llama.cpp/`` is the full
llama.cpp tree. The build lives outside any clone, in ``$HF_EXT_CACHE/llama.cpp/0.3.36`` (default
``~/.cache/hf_ext``), so CI and every checkout reuse it. Build it once (about 6 minutes on 2 cores)::

    hf-ext llamacpp build

Example:
    >>> from hf_ext.llamacpp import convert_to_gguf, llamacpp_perplexity, llamacpp_kv_cache_mib
    >>> gguf = convert_to_gguf("out/smollm2-deepseek", "out/smollm2-deepseek.f16.gguf")   # doctest: +SKIP
    >>> llamacpp_perplexity(gguf, "eval.txt", n_ctx=512)["ppl"]                             # doctest: +SKIP
    >>> llamacpp_kv_cache_mib(gguf, n_ctx=16384)                                            # doctest: +SKIP
    56.25
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import HfExtError

LLAMACPP_SDIST = "llama-cpp-python==0.3.36"      # its vendor/llama.cpp is the source we build and test against
VERSION = LLAMACPP_SDIST.split("==")[1]
TOOLS = ("llama-perplexity", "llama-bench")
BUILD_COMMAND = "hf-ext llamacpp build"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class LlamaCppMissingError(HfExtError, FileNotFoundError):
    """No llama.cpp build in the cache; the message gives the command that builds one."""


class LlamaCppError(HfExtError, RuntimeError):
    """A llama.cpp tool failed; the message carries the end of its log."""


def llamacpp_dir() -> Path:
    """Where the pinned llama.cpp source and its ``build/`` live (``$HF_EXT_CACHE/llama.cpp/<version>``)."""
    root = Path(os.environ.get("HF_EXT_CACHE", Path.home() / ".cache" / "hf_ext"))
    return root / "llama.cpp" / VERSION


def llamacpp_tool(name: str) -> Path:
    """Path of one llama.cpp binary (``llama-bench``, ``llama-perplexity``, ...) in the pinned build."""
    return llamacpp_dir() / "build" / "bin" / name


def is_built() -> bool:
    return (llamacpp_dir() / "build" / ".complete").exists() and all(llamacpp_tool(t).exists() for t in TOOLS)


def ensure_llamacpp(build: bool = False) -> Path:
    """Return the llama.cpp folder; build it first if ``build`` (else raise ``LlamaCppMissingError``)."""
    if not is_built():
        if not build:
            raise LlamaCppMissingError(f"no llama.cpp build at {llamacpp_dir()}; build one (about 6 minutes on "
                                       f"2 cores, needs cmake and a C++ compiler) with: {BUILD_COMMAND}")
        build_llamacpp()
    return llamacpp_dir()


def build_llamacpp(jobs: int | None = None) -> Path:
    """Download the pinned sdist from PyPI, unpack its llama.cpp and build the tools (idempotent)."""
    dest = llamacpp_dir()
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise LlamaCppMissingError(f"building llama.cpp needs `{exe}`; install it (Debian: apt-get install "
                                       "cmake g++), then run: " + BUILD_COMMAND)
    if not (dest / "convert_hf_to_gguf.py").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:   # unpacked whole, then renamed: never half there
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                  LLAMACPP_SDIST, "-d", tmp], "pip download")
            sdist = next(Path(tmp).glob("*.tar.gz"))
            prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(Path(tmp) / "src", members=members, filter="data")
            os.replace(Path(tmp) / "src", dest)
    _run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF"], "cmake configure", cwd=dest)
    _run(["cmake", "--build", "build", "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS],
         "cmake build", cwd=dest, stream=True)
    (dest / "build" / ".complete").write_text(LLAMACPP_SDIST + "\n")
    return dest


def _run(cmd: list, what: str, cwd=None, env=None, stream: bool = False, check: bool = True) -> str:
    """Run a tool; return stdout+stderr. With ``stream`` the log goes to stderr as it comes (long builds)."""
    if stream:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=sys.stderr, stderr=subprocess.STDOUT, text=True)
        log = ""
    else:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        log = p.stdout + p.stderr
    if check and p.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise LlamaCppError(f"{what} failed (exit {p.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return log


def convert_to_gguf(hf_folder, out, outtype: str = "f16") -> Path:
    """Convert a saved HF folder with llama.cpp's ``convert_hf_to_gguf.py``; ``out`` appears only when complete."""
    if outtype not in OUTTYPES:
        raise LlamaCppError(f"outtype {outtype!r} is not one of {OUTTYPES}")
    if not (Path(hf_folder) / "config.json").exists():
        raise LlamaCppError(f"{hf_folder} has no config.json; pass a folder written by save_pretrained")
    src, out = ensure_llamacpp(), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}
    try:
        _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_folder), "--outfile", str(part),
              "--outtype", outtype], f"llama.cpp's converter on {hf_folder}", env=env)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _threads(threads):
    return str(threads or os.cpu_count() or 1)


def llamacpp_perplexity(gguf, text_file, n_ctx: int = 512, threads: int | None = None, f32_cache: bool = False,
                        n_chunks: int | None = None) -> dict:
    """``llama-perplexity``: exp(mean NLL) over non-overlapping n_ctx chunks, scoring each chunk's second half.

    Returns ``{"ppl", "ppl_err", "n_chunks", "kv_mib"}``. ``f32_cache`` keeps K/V (the latent, for MLA) in fp32
    instead of llama.cpp's default f16, for an exactness check. ``hf_ext.eval.llamacpp_protocol_perplexity``
    computes the same figure with our model.
    """
    cmd = [str(llamacpp_tool("llama-perplexity")), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
           "-b", str(n_ctx), "-t", _threads(threads), "--no-warmup", "-lv", "4"]   # 4: log the KV cache size
    if f32_cache:
        cmd += ["-ctk", "f32", "-ctv", "f32"]
    if n_chunks:
        cmd += ["--chunks", str(n_chunks)]
    ensure_llamacpp()
    log = _run(cmd, "llama-perplexity")
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if m is None or chunks is None:
        raise LlamaCppError("llama-perplexity printed no estimate (is the text at least 2 x n_ctx tokens?):\n"
                            + "\n".join(log.strip().splitlines()[-10:]))
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "n_chunks": int(chunks.group(1)),
            "kv_mib": parse_kv_mib(log)}


def parse_kv_mib(log: str) -> float:
    # llama_kv_cache: size =   56.25 MiB ( 16384 cells,  30 layers,  1/1 seqs), K (f16):   56.25 MiB, V (f16):    0.00 MiB
    m = re.search(r"llama_kv_cache: size = +([\d.]+) MiB", log)
    if m is None:
        raise LlamaCppError("llama.cpp's log has no 'llama_kv_cache: size' line:\n" + "\n".join(log.splitlines()[-10:]))
    return float(m.group(1))


def llamacpp_kv_cache_mib(gguf, n_ctx: int, threads: int | None = None) -> float:
    """The KV cache size llama.cpp itself allocates for ``n_ctx`` tokens (f16 cache, one sequence), in MiB."""
    ensure_llamacpp()
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:   # too short on purpose: it loads, allocates, stops
        f.write("hello\n")
        f.flush()
        log = _run([str(llamacpp_tool("llama-perplexity")), "-m", str(gguf), "-f", f.name, "-c", str(n_ctx),
                    "-t", _threads(threads), "--no-warmup", "-lv", "4"], "llama-perplexity", check=False)
    return parse_kv_mib(log)


def llamacpp_bench(gguf, depths=(0, 4096, 16384), flash_attn=(0, 1), n_gen: int = 32, reps: int = 3,
                   threads: int | None = None, cache_type: str = "f16") -> list[dict]:
    """``llama-bench``: generation tok/s after ``depth`` tokens of context, for each flash-attention setting.

    ``cache_type`` is the KV cache's type (``-ctk``/``-ctv``: f16, bf16, q8_0, ...; llama.cpp needs flash
    attention for a quantized V cache). Returns rows ``{"depth", "flash_attn", "cache", "tok_s", "tok_s_std",
    "samples"}`` (llama-bench's own statistics over ``reps`` repetitions).
    """
    ensure_llamacpp()
    cmd = [str(llamacpp_tool("llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-r", str(reps),
           "-d", ",".join(map(str, depths)), "-fa", ",".join(map(str, flash_attn)), "-t", _threads(threads),
           "-ctk", cache_type, "-ctv", cache_type, "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise LlamaCppError(f"llama-bench failed (exit {p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-10:]))
    rows = json.loads(p.stdout)
    return [{"depth": r["n_depth"], "flash_attn": int(r["flash_attn"]), "cache": cache_type, "tok_s": r["avg_ts"],
             "tok_s_std": r["stddev_ts"], "samples": r.get("samples_ts")} for r in rows]


def measure_in_llamacpp(source_folder, export_folder, text: str, n_ctx: int = 512, n_chunks: int = 8,
                        kv_context: int = 16384) -> dict:
    """The source and its export side by side in llama.cpp (f16 GGUFs, made in a temporary folder):
    perplexity on ``text`` by llama-perplexity's protocol and the KV cache llama.cpp allocates at ``kv_context``."""
    ensure_llamacpp()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        text_file = Path(d) / "eval.txt"
        text_file.write_text(text)
        for name, folder in (("source", source_folder), ("export", export_folder)):
            gguf = convert_to_gguf(folder, Path(d) / f"{name}.f16.gguf", "f16")
            r = llamacpp_perplexity(gguf, text_file, n_ctx, n_chunks=n_chunks)
            out[f"llamacpp_ppl_{name}"] = r["ppl"]
            out[f"llamacpp_kv_mib_{kv_context // 1024}k_{name}"] = llamacpp_kv_cache_mib(gguf, kv_context)
            gguf.unlink()
    out["llamacpp_kv_smaller_by"] = out[f"llamacpp_kv_mib_{kv_context // 1024}k_source"] / \
        out[f"llamacpp_kv_mib_{kv_context // 1024}k_export"]
    out["llamacpp_chunks"], out["llamacpp_n_ctx"] = n_chunks, n_ctx
    return out
