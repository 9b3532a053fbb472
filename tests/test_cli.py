"""The `hf-ext` command line: flags take their defaults (and names) from the config dataclasses, a command's
options are built only when it is chosen, and the light commands start without torch."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from conversion.cli import build_parser, named_command

# (command, field): why the flag's default is not the field's
EXEMPT = {
    ("hf-ext convert icc", "ridge"): "'auto' picks ICCConfig.ridge on a development run (select_ridge)",
    ("hf-ext convert mla", "qk_rope_head_dim"): "unset means 24, or 32 with --target deepseek_v3 "
                                                "(hf_ext.mla.resolve_target_dims)",
    ("hf-ext sae train", "architecture"): "SAEConfig keeps SAELens's default (standard) for cfg.json files "
                                          "without the key; the CLI trains top-k, the better trade-off",
}


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return None if f.default_factory is dataclasses.MISSING else f.default_factory()      # None: required


def config_flags():
    """(command, option action, config class, field) for every option whose dest is a field of a config the
    command reads its defaults from."""
    parser = build_parser(every=True)
    for prog, (p, _) in parser.commands.items():
        for config in getattr(p, "config_classes", ()):
            fields = {f.name: f for f in dataclasses.fields(config)}
            for action in p._actions:                 # argparse has no public list of a parser's options
                if action.dest in fields:
                    yield prog, action, config, fields[action.dest]


def test_every_config_flag_defaults_to_its_field_and_is_named_after_it():
    seen = list(config_flags())
    commands = {prog for prog, *_ in seen}
    assert {"hf-ext convert tinysr", "hf-ext convert icc", "hf-ext convert mla", "hf-ext finetune meft",
            "hf-ext myopic synthetic", "hf-ext myopic gap", "hf-ext sae train"} <= commands
    for prog, action, config, f in seen:
        if (prog, f.name) in EXEMPT:
            continue
        want = None if action.required else field_default(f)
        assert action.default == want, f"{prog} {action.option_strings[0]}: default {action.default!r}, " \
                                       f"{config.__name__}.{f.name} is {want!r}"
        dashed = f.name.replace("_", "-")
        assert f"--{dashed}" in action.option_strings or f"--no-{dashed}" in action.option_strings, \
            f"{prog}: the flag for {config.__name__}.{f.name} is {action.option_strings}, not --{dashed}"


def test_old_flag_spellings_still_parse():
    parser = build_parser(every=True)
    args = parser.parse_args(["sae", "train", "--store", "s", "--out", "o", "--variant", "jumprelu", "--l1", "2"])
    assert args.architecture == "jumprelu" and args.l1_coefficient == 2.0
    args = parser.parse_args(["convert", "mla", "--out", "o", "--rope-dim", "16"])
    assert args.qk_rope_head_dim == 16
    args = parser.parse_args(["convert", "tinysr", "--teacher", "t", "--keep-blocks", "2", "--vae-width", "8",
                              "--out", "o", "--no-sepconv"])
    assert args.sepconv is False and args.drop_text_stream is False


def test_only_the_named_command_gets_its_options():
    parser = build_parser(["convert", "tinysr", "--help"])
    assert named_command(parser, ["convert", "tinysr", "--help"]) == "hf-ext convert tinysr"
    assert named_command(parser, ["convert", "--help"]) is None
    built = {prog for prog, (p, _) in parser.commands.items() if getattr(p, "config_classes", None)}
    assert built == {"hf-ext convert tinysr"}


@pytest.mark.parametrize("argv", [["zoo", "list"], ["--help"], ["convert", "--help"]])
def test_light_commands_start_without_torch_or_warnings(argv):
    code = (f"import json, sys\nfrom conversion.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'diffusers', 'torchao') if m in sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    assert run.stderr == ""


def test_resolve_target_dims_fills_only_what_is_unset():
    from transformers import LlamaConfig

    from hf_ext.mla import resolve_target_dims
    from hf_ext.mla.export import engine_latent_dims

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=64,  # SmolLM2
                      num_hidden_layers=1, vocab_size=32)
    plain = resolve_target_dims(cfg)
    assert (plain.kv_ratio, plain.kv_lora_rank, plain.qk_rope_head_dim) == (6.4, None, 24)
    assert resolve_target_dims(cfg, kv_ratio=4.0, qk_rope_head_dim=16).kv_ratio == 4.0
    given = resolve_target_dims(cfg, kv_ratio=4.0, kv_lora_rank=16)          # an explicit rank wins
    assert (given.kv_ratio, given.kv_lora_rank) == (None, 16)
    ds = resolve_target_dims(cfg, target="deepseek_v3")
    assert (ds.kv_lora_rank, ds.qk_rope_head_dim) == engine_latent_dims(cfg) and ds.kv_ratio is None
    assert resolve_target_dims(cfg, target="deepseek_v3", energy=0.9).qk_rope_head_dim == 24
