"""MEFT benchmark: activation memory and step time vs full FT, LoRA and LoRA + checkpointing.

    python benchmarks/meft.py --out benchmarks/results/meft.json

Side by side in one process on the real MiniLM (batch 32x128, sequence classification) and SmolLM2
(batch 4x512, causal LM). Activation bytes are what the autograd graph holds for backward, read from
the graph (hf_ext.meft.measure), deduplicated by storage. Step time is the median of timed
forward+backward steps after one warm-up. Depth: a tiny BERT at 4 and 8 layers.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.eval import tokenize  # noqa: E402
from hf_ext.meft import MeftConfig  # noqa: E402
from hf_ext.meft.measure import saved_activation_bytes  # noqa: E402
from hf_ext.zoo import load_corpus, resolve_model  # noqa: E402


NOTES = {
    "MiniLM (32x128)": "Activation bytes held for backward (graph walk, deduplicated by storage); step = median "
                       "forward+backward seconds. LoRA uses peft's default targets (query, value).",
    "SmolLM2-135M (4x512)": "Every method also holds the loss's 4x512x49152 fp32 logits (384 MiB), which MEFT "
                            "does not touch (it makes the layers reversible, not the LM head).",
    "Depth (tiny BERT, 8x64)": "Same model at 4 and 8 layers: MEFT's saved activations do not grow with depth.",
}


def methods(task):
    from peft import LoraConfig, get_peft_model

    def full(m):
        return m.train()

    def lora(m):
        return get_peft_model(m, LoraConfig(r=8, task_type=task)).train()

    def lora_ckpt(m):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
        return lora(m)

    def meft(variant):
        return lambda m: get_peft_model(m, MeftConfig(variant=variant, task_type=task, check_every=0)).train()

    return {"full FT": full, "LoRA r=8": lora, "LoRA r=8 + checkpointing": lora_ckpt,
            "MEFT1 (defaults)": meft("meft1"), "MEFT3 (defaults)": meft("meft3")}


def measure(make_model, wrap, batch, steps):
    model = wrap(make_model())
    act = saved_activation_bytes(model(**batch).loss, model)     # runs its own backward
    times = []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        model(**batch).loss.backward()
        if i:
            times.append(time.perf_counter() - t)
    return act, statistics.median(times)


def section(name, make_model, task, batch, steps):
    rows = []
    for label, wrap in methods(task).items():
        act, t = measure(make_model, wrap, batch, steps)
        rows.append({"method": label, "activation_MB": act / 2**20, "step_s": t})
        print(f"{name:10s} {label:26s} act {act / 2**20:9.1f} MB  step {t:6.2f} s", flush=True)
    full = rows[0]["activation_MB"]
    ckpt = rows[2]
    for r in rows:
        r["activation_vs_full"] = r["activation_MB"] / full
        r["step_vs_lora_ckpt"] = r["step_s"] / ckpt["step_s"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/meft.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForSequenceClassification

    mini = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(mini)
    ids = tokenize(tok, load_corpus("python-docs:train"), 32 * 128).view(32, 128)
    mini_batch = dict(input_ids=ids, labels=torch.arange(32) % 8)
    out = {"MiniLM (32x128)": section("minilm", lambda: BertForSequenceClassification.from_pretrained(
        mini, num_labels=8), "SEQ_CLS", mini_batch, args.steps)}

    smol = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(smol)
    ids = tokenize(tok, load_corpus("python-docs:train"), 4 * 512).view(4, 512)
    out["SmolLM2-135M (4x512)"] = section("smollm2", lambda: AutoModelForCausalLM.from_pretrained(
        smol, dtype=torch.float32), "CAUSAL_LM", dict(input_ids=ids, labels=ids), max(1, args.steps - 1))

    depth = []
    for layers in (4, 8):
        def make(layers=layers):
            torch.manual_seed(0)
            return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers,
                                                            num_attention_heads=4, intermediate_size=128, num_labels=3))
        batch = dict(input_ids=torch.randint(0, 100, (8, 64)), labels=torch.arange(8) % 3)
        for label in ("full FT", "MEFT1 (defaults)", "MEFT3 (defaults)"):
            act, _ = measure(make, methods("SEQ_CLS")[label], batch, 1)
            depth.append({"layers": layers, "method": label, "activation_KB": act / 1024})
            print(f"depth {layers} {label:20s} act {act / 1024:8.1f} KB", flush=True)
    out["Depth (tiny BERT, 8x64)"] = depth
    out = {k: {"note": NOTES[k], "rows": v} for k, v in out.items()}
    res = {"title": "MEFT: activation memory and step time", "command": "python benchmarks/meft.py",
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "sections": out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
