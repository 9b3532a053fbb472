"""MEFT numerical safety: gradient error vs ordinary autograd, and reconstruction error, per setting.

    python benchmarks/meft_safety.py --out benchmarks/results/meft_safety.json

Real MiniLM (4x128, dropout on) and SmolLM2 (2x128), fp32 compute (and a bf16 section); adapters drawn at std 0.02 so every
gradient is live; the same dropout masks in both runs. grad_rel_err = |g_rev - g_autograd| / |g_autograd|;
recon_err = max relative error of the first layer's input after the whole stack and back (the monitor's
number; it warns above 1e-4). The scale sweep also gives init_dev = |h - h_PLM| / |h_PLM| of the last hidden
state with the adapters at zero (how far from the pretrained model training starts) and bits = k * layers *
(2 for MEFT3, else 1) for scales 2^-k: ``default_scales`` takes the smallest scale within 36 bits.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_ext.eval import tokenize  # noqa: E402
from hf_ext.meft import MeftConfig  # noqa: E402
from hf_ext.meft.measure import reversible_grad_error  # noqa: E402
from hf_ext.zoo import load_causal_lm, load_corpus, resolve_model  # noqa: E402


def init_deviation(pm, batch) -> float:
    """|h - h_PLM| / |h_PLM| of the last hidden state, adapters as they are (at zero after injection)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    encoder = pm.base_model.model.base_model                      # BertModel inside the classifier
    with torch.no_grad():
        pm.eval()
        h = encoder(**inputs).last_hidden_state
        with pm.disable_adapter():
            h0 = encoder(**inputs).last_hidden_state
    pm.train()
    return float((h - h0).norm() / h0.norm())


def row(make, task, batch, deviation=False, **kw):
    from peft import get_peft_model

    pm = get_peft_model(make(), MeftConfig(task_type=task, check_every=1, check_threshold=float("inf"), **kw)).train()
    dev = init_deviation(pm, batch) if deviation else None
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "meft_" in n and p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    err = reversible_grad_error(pm, batch)
    cfg = pm.base_model.peft_config["default"]
    r = {"variant": cfg.variant, "lam": cfg.lam, "beta": cfg.beta, "streams": cfg.reconstruction_dtype,
         "grad_rel_err": err, "recon_err": pm.base_model.last_recon_error}
    if deviation:
        n = sum(1 for m in pm.modules() if type(m).__name__ == "MeftLayer")
        k = round(-math.log2(min(cfg.lam, cfg.beta)))
        r = {**r, "init_dev": dev, "bits": k * n * (2 if cfg.variant == "meft3" else 1)}
    print(r, flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/meft_safety.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer, BertForSequenceClassification

    mini = resolve_model("minilm-l6")
    ids = tokenize(AutoTokenizer.from_pretrained(mini), load_corpus("python-docs:eval"), 512).view(4, 128)
    mb = dict(input_ids=ids, labels=torch.tensor([0, 3, 5, 7]))
    make = lambda: BertForSequenceClassification.from_pretrained(mini, num_labels=8)  # noqa: E731
    m_rows = [row(make, "SEQ_CLS", mb, variant=v, lam=lam, beta=beta, reconstruction_dtype=dt)
              for v, lam, beta, dt in [("meft1", 0.1, 1.0, "float32"), ("meft3", 0.1, 0.1, "float32"),
                                       ("meft1", 1.0, 1.0, "float32"), ("meft3", 1.0, 1.0, "float32"),
                                       ("meft1", 0.1, 1.0, "float64"), ("meft3", 0.1, 0.1, "float64")]]
    m_rows += [row(make, "SEQ_CLS", mb, variant=v) for v in ("meft1", "meft2", "meft3")]   # defaults
    sweep = [row(make, "SEQ_CLS", mb, deviation=True, variant=v, lam=2.0 ** -k if v != "meft2" else 1.0,
                 beta=2.0 ** -k if v != "meft1" else 1.0)
             for v, ks in (("meft1", range(3, 10)), ("meft2", range(3, 9)), ("meft3", range(1, 6))) for k in ks]
    make16 = lambda: BertForSequenceClassification.from_pretrained(mini, num_labels=8, dtype=torch.bfloat16)  # noqa: E731
    b_rows = [row(make16, "SEQ_CLS", mb, variant=v, **kw) for v in ("meft1", "meft3")
              for kw in ({}, {"reconstruction_dtype": "bfloat16"}, {"lam": 1.0, "beta": 1.0, "reconstruction_dtype": "bfloat16"})]
    tok = load_causal_lm("smollm2-135m")[1]
    ids = tokenize(tok, load_corpus("python-docs:eval"), 256).view(2, 128)
    sb = dict(input_ids=ids, labels=ids)
    s_rows = [row(lambda: load_causal_lm("smollm2-135m")[0], "CAUSAL_LM", sb, variant="meft1", lam=lam, beta=1.0, reconstruction_dtype=dt)
              for lam, dt in [(0.5, "float64"), (1.0, "float32"), (1.0, "float64")]]
    res = {"title": "MEFT: which settings give trustworthy gradients", "command": "python benchmarks/meft_safety.py",
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "sections": {
               "MiniLM (post-LN, 6 layers)": {"note": "Last three rows: the defaults (power-of-two scales, "
                                              "float64 streams).", "rows": m_rows},
               "MiniLM: scale sweep (float64 streams)": {
                   "note": "Scales 2^-k. The monitor's bound is recon_err 1e-4; default_scales keeps bits <= 36.",
                   "rows": sweep},
               "MiniLM in bfloat16": {"note": "Model weights and F/G compute in bf16 (adapters fp32). Rows 1 and 4: "
                                      "the defaults (float64 streams).", "rows": b_rows},
               "SmolLM2-135M (pre-LN, 30 layers)": {"note": "F contains the residual, so the streams grow "
                                                    "with depth.", "rows": s_rows}}}
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
