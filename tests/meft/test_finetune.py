"""docs-sections task, the fine-tuning loop and `hf-ext finetune meft` (tiny BERT + the real tokenizer).

Every test reads the Python docs (Debian's python3.11-doc) and MiniLM's tokenizer: offline real assets."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from conversion.cli import build_parser, main
from hf_ext.meft.train import FinetuneConfig, FinetuneError, evaluate
from hf_ext.tasks import DOCS_SECTIONS, load_task
from hf_ext.zoo import resolve_model
from numerics import TINY_FP32_ATOL

pytestmark = pytest.mark.real


def accuracy_bounds(model, tok, task, max_length):
    """The accuracy an independent evaluation allows: predictions by hand, one unpadded paragraph at a time
    (other shapes than ``evaluate``'s batches of 64), so logits agree with ``evaluate``'s to TINY_FP32_ATOL;
    a paragraph whose top-2 logits are closer than twice that may go either way."""
    sure = right = 0
    with torch.no_grad():
        for text, y in zip(task.texts, task.labels):
            logits = model(**tok(text, truncation=True, max_length=max_length, return_tensors="pt")).logits[0]
            top = logits.topk(2)
            decided = float(top.values[0] - top.values[1]) > 2 * TINY_FP32_ATOL
            sure += decided
            right += decided and int(top.indices[0]) == y
    n = len(task)
    return right / n, (right + n - sure) / n


def test_docs_sections_split_is_fixed_disjoint_and_labelled():
    train, dev, test = (load_task("docs-sections", s) for s in ("train", "dev", "eval"))
    assert not set(train.texts) & set(test.texts) and not set(dev.texts) & (set(train.texts) | set(test.texts))
    for split in (dev, test):
        assert set(split.labels) == set(range(len(DOCS_SECTIONS)))      # every class is in dev and eval
        assert 0.05 < len(split) / (len(train) + len(dev) + len(test)) < 0.15
    capped = load_task("docs-sections", "train", max_per_class=50)
    assert max(capped.class_counts().values()) == 50 and set(capped.texts) <= set(train.texts)
    assert load_task("docs-sections", "eval").texts == test.texts    # deterministic
    # the cap samples the whole section, not its first files (library is 6000+ paragraphs of ~300 modules)
    library = [t for t, y in zip(train.texts, train.labels) if y == 0]
    where = sorted(library.index(t) / len(library) for t, y in zip(capped.texts, capped.labels) if y == 0)
    assert where[0] < 0.1 and where[-1] > 0.9 and 0.3 < where[len(where) // 2] < 0.7


def test_bad_task_and_settings():
    from hf_ext.errors import BadTextError

    with pytest.raises(BadTextError, match="available: docs-sections"):
        load_task("glue", "train")
    with pytest.raises(BadTextError, match="use one of train, dev, eval"):
        load_task("docs-sections", "test")
    with pytest.raises(FinetuneError, match="choose one of meft, lora, full"):
        FinetuneConfig(method="prefix")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with the real MiniLM tokenizer, saved like a Hub checkpoint."""
    d = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             num_labels=len(DOCS_SECTIONS))).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_finetune_saves_an_adapter_that_reloads_exactly(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["finetune", "meft", "--model", str(tiny_bert_dir), "--variant", "meft3", "--epochs", "1",
               "--max-per-class", "8", "--max-length", "32", "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["train_examples"] == 64
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "hf_ext_report.json"} <= \
        {p.name for p in out.iterdir()}
    assert "--variant meft3" in (out / "README.md").read_text()
    import hf_ext.meft  # noqa: F401
    base = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(DOCS_SECTIONS))
    model = PeftModel.from_pretrained(base, out)
    tok = AutoTokenizer.from_pretrained(out)
    task = load_task("docs-sections", "eval")
    lo, hi = accuracy_bounds(model.eval(), tok, task, max_length=32)
    # the reported accuracy is the saved adapter + head's, computed independently (ties aside)
    assert hi - lo < 0.01 and lo <= result["accuracy"] <= hi
    # the same evaluation of the same weights runs the same kernels on the same values: bit for bit
    assert evaluate(model, tok, task, max_length=32)["accuracy"] == result["accuracy"]


def test_select_epoch_keeps_the_best_dev_epoch(tiny_bert_dir):
    from hf_ext.meft.train import finetune

    cfg = FinetuneConfig(model=str(tiny_bert_dir), method="meft", epochs=3, max_per_class=8, max_length=32, lr=3e-2)
    model, tok, result = finetune(cfg, progress=False)
    curve = result["dev_accuracy_per_epoch"]
    assert len(curve) == 3 and result["selected_epoch"] == 1 + curve.index(max(curve))
    # the restored best epoch, evaluated as during training (same kernels, same values): bit for bit
    assert evaluate(model, tok, load_task("docs-sections", "dev"), max_length=32)["accuracy"] == max(curve)


def test_cli_bad_input_leaves_nothing(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "meft", "--model", str(tiny_bert_dir), "--lam", "0", "--out", str(out)]) == 2
    assert "lam=0" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", "meft", "--model", str(tiny_bert_dir), "--task", "glue", "--out", str(out)]) == 2
    assert "unknown task 'glue'" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert main(["finetune", "meft", "--model", str(tiny_bert_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]


def test_cli_schedule_default_is_the_config_default():
    """`hf-ext finetune meft` and `FinetuneConfig` share the measured schedule, so the two cannot drift apart."""
    argv = ["finetune", "meft", "--out", "x"]
    args = build_parser(argv).parse_args(argv)
    assert args.epochs == FinetuneConfig.epochs == 8
