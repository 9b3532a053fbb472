"""Top-k SAEs on real activations of MiniLM-L6 and SmolLM2-135M (the `sae` part of benchmarks/vit_hooks.py).

    python benchmarks/vit_hooks.py --parts sae

Train rows: every token of python-docs:train (windows of 128), residual stream after a middle block.
Eval rows and the splice test: python-docs:eval (other files), never trained on.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path


from hf_ext.vit_hooks import HookedVision
from hf_ext.vit_hooks.loading import load_hookable
from hf_ext.vit_hooks.sae import SAEConfig
from hf_ext.vit_hooks.sae.train import SAETrainConfig, evaluate_sae, train_sae
from hf_ext.vit_hooks.splice import embedding_cosine_loss, next_token_loss, spliced_loss
from hf_ext.vit_hooks.store import cache_activations, text_batches
from hf_ext.zoo import corpus_files

CASES = [  # model, hook, train rows, epochs, splice loss
    ("minilm-l6", "blocks.3.hook_resid_post", 200_000, 3, embedding_cosine_loss),
    ("smollm2-135m", "blocks.15.hook_resid_post", 100_000, 3, next_token_loss),
]
K, EXPANSION, SEQ = 32, 16, 128


def _texts(split):
    return (f.read_text(encoding="utf-8", errors="replace") for f in corpus_files(f"python-docs:{split}"))


def sae_rows() -> dict:
    rows = []
    for spec, hook, n_train, epochs, loss_fn in CASES:
        h = load_hookable(spec)
        hv = HookedVision(h.model)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            cache_activations(hv, hook, text_batches(h.tokenizer, _texts("train"), SEQ, 8), d / "train",
                              model_name=h.name, max_rows=n_train, progress=False)
            cache_activations(hv, hook, text_batches(h.tokenizer, _texts("eval"), SEQ, 8), d / "eval",
                              model_name=h.name, max_rows=20_000, progress=False)
            width = h.model.config.hidden_size
            sae, log = train_sae(d / "train", SAEConfig(d_in=width, d_sae=EXPANSION * width, architecture="topk", k=K),
                                 SAETrainConfig(total_rows=epochs * n_train, eval_every=0), progress=False)
            ev = evaluate_sae(sae, d / "eval")
        batches = list(text_batches(h.tokenizer, _texts("eval"), SEQ, 4))[:8]
        sp = spliced_loss(hv, sae, hook, batches, loss_fn)
        rows.append({"model": h.name, "hook": hook, "d_in": width, "d_sae": EXPANSION * width, "k": K,
                     "train_rows": n_train, "steps": log["steps"], "eval_rows": ev.get("rows", 20_000),
                     "explained_variance": ev["explained_variance"], "l0": ev["l0"],
                     "dead_fraction": ev["dead_fraction"],
                     "downstream": "next-token CE" if loss_fn is next_token_loss else "1 - cos(sentence emb.)",
                     **sp})
        print(json.dumps(rows[-1]), flush=True)
    note = (f"Top-k SAEs (k={K}, {EXPANSION}x expansion), trained with hf_ext.vit_hooks.train_sae on every token of "
            f"python-docs:train ({SEQ}-token windows) for the given rows x 3 epochs, batch 4096; scored on 20k rows "
            "of python-docs:eval. loss_* splice the reconstruction (or zeros) into the model at the hook over 8 "
            "eval batches of 4 x 128; loss_recovered = (zero - spliced) / (zero - clean).")
    return {"note": note, "rows": rows}
