"""The conversion's fast path: what int8 writes or knows without importing compressed-tensors or
transformers must equal what those libraries say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from int8.formats.compressed_tensors import build_config


def _reference_config(groups: dict[int, list[str]], ignore: list[str], named: tuple[str, ...] = ()) -> dict:
    """compressed-tensors' own serialization of the same quantization config."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    sizes = sorted(groups, reverse=True)
    schemes = {
        f"group_{i}": QuantizationScheme(
            targets=["Linear", *sorted(set(named) & set(groups[size]))] if len(sizes) == 1 else sorted(groups[size]),
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=size, dynamic=False),
            format="pack-quantized",
        )
        for i, size in enumerate(sizes)
    }
    qc = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed", ignore=ignore)
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude={"quant_method"}, mode="json"),
    }


@pytest.mark.parametrize(
    "groups, ignore, named",
    [
        ({128: ["model.layers.0.mlp.up_proj"]}, ["lm_head"], ()),
        ({128: ["b.o_proj", "a.o_proj"], 64: ["a.down_proj"], 32: ["a.q_proj", "a.k_proj"]}, [], ()),
        ({32: ["x"]}, ["lm_head", "encoder.block.0.layer.0.SelfAttention.q"], ()),
        ({128: ["transformer.wte", "transformer.h.0.attn.q_proj"]}, [], ("transformer.wte",)),
        ({128: ["shared", "a.o"], 64: ["a.wo"]}, [], ("shared",)),
    ],
)
def test_quantization_config_is_compressed_tensors_serialization(groups, ignore, named):
    ours = build_config(groups, ignore, named)
    ref = _reference_config(groups, ignore, named)
    assert json.dumps(ours) == json.dumps(ref)  # same keys, same values, same order
    # and compressed-tensors parses it back to the same config
    from compressed_tensors.quantization import QuantizationConfig

    body = {k: v for k, v in ours.items() if k not in ("version", "sparsity_config", "transform_config")}
    assert QuantizationConfig.model_validate(body).model_dump(mode="json") == QuantizationConfig.model_validate(
        {k: v for k, v in ref.items() if k not in ("version", "sparsity_config", "transform_config")}
    ).model_dump(mode="json")


# --------------------------------------------------------------------------- the architecture table

from models import ARCHS, tiny_config  # noqa: E402

from int8 import architectures  # noqa: E402
from int8.architectures import ARCHITECTURES, from_model, from_table  # noqa: E402
from int8.hf import TokenEmbeddings  # noqa: E402

TABLE_ARCHS = (*ARCHS, "llama")
VARIANTS = {  # per architecture: config overrides that change the structure
    "gptj": [{}, {"tie_word_embeddings": True}, {"n_inner": 384}],
    "gpt2": [{}, {"tie_word_embeddings": False}, {"n_inner": 256}],
    "bloom": [{}, {"tie_word_embeddings": False}],
    "llama": [{}, {"tie_word_embeddings": False}, {"attention_bias": True, "mlp_bias": True}, {"num_key_value_heads": None}],
    "t5": [{}, {"tie_word_embeddings": False}, {"feed_forward_proj": "relu"}, {"num_decoder_layers": 3}],
    "mt5": [{}, {"tie_word_embeddings": True}, {"feed_forward_proj": "relu"}],
}


def _meta_model(cfg):
    from int8.hf import build_meta_model

    return build_meta_model(cfg)


def _meta_facts(cfg):
    return from_model(_meta_model(cfg))


def test_the_table_covers_every_architecture_of_the_tests():
    assert set(TABLE_ARCHS) == {a.model_type for a in ARCHITECTURES.values()}


@pytest.mark.parametrize("arch", TABLE_ARCHS)
def test_table_defaults_are_transformers_config_defaults(arch):
    import transformers as tf

    entry = ARCHITECTURES[tiny_config(arch).model_type]
    cls = tf.AutoConfig.for_model(entry.model_type).__class__
    defaults = cls().to_dict()
    for name, value in entry.defaults.items():
        if value is not None:  # None: derived from other fields (as transformers does), see the structure test
            assert defaults[name] == value, (arch, name)
    assert entry.model_class in {c.__name__ for c in _auto_classes(cls)}


def _auto_classes(config_cls):
    import transformers as tf

    out = []
    for auto in (tf.AutoModelForCausalLM, tf.AutoModelForSeq2SeqLM):
        try:
            out.append(auto._model_mapping[config_cls])
        except (KeyError, ValueError):
            pass
    return out[:1]


@pytest.mark.parametrize("arch, overrides", [(a, o) for a in TABLE_ARCHS for o in VARIANTS[a]])
def test_table_facts_equal_the_meta_model_facts(arch, overrides, tmp_path):
    from int8.hf import load_config

    # what a saved config.json holds: only the fields that differ from the defaults
    data = {**json.loads(tiny_config(arch).to_json_string(use_diff=True)), **overrides}
    (tmp_path / "config.json").write_text(json.dumps(data))
    ours = from_table(data)
    assert ours is not None
    ref = _meta_facts(load_config(tmp_path))  # the model transformers builds from that config.json
    assert dict(ours.params) == dict(ref.params)
    assert list(ours.params) == list(ref.params)  # same order: the plan's entries follow the checkpoint, ties the keys
    assert {k: v for k, v in ref.modules.items() if k in ours.modules or v != architectures.ModuleKind.OTHER} == dict(
        ours.modules
    )
    assert dict(ours.tied) == dict(ref.tied)
    assert ours.fp32_modules == ref.fp32_modules
    assert ours.output_embeddings == ref.output_embeddings
    assert ours.ignore_missing == ref.ignore_missing
    assert ours.buffers == ref.buffers
    assert (ours.model_class, ours.prefix, ours.input_embedding) == (ref.model_class, ref.prefix, ref.input_embedding)
    assert ours.vocab == ref.vocab == TokenEmbeddings.of(_meta_model(load_config(tmp_path)))


def test_the_table_passes_over_what_it_does_not_model():
    data = json.loads(tiny_config("gpt2").to_json_string(use_diff=True))
    assert from_table({**data, "add_cross_attention": True}) is None
    assert from_table({**data, "architectures": ["GPT2ForSequenceClassification"]}) is None
    assert from_table({**data, "model_type": "opt"}) is None
    assert from_table({k: v for k, v in data.items() if k != "architectures"}) is not None


def test_a_bad_field_is_a_corrupt_checkpoint():
    from int8.errors import CorruptCheckpoint

    data = json.loads(tiny_config("gptj").to_json_string(use_diff=True))
    with pytest.raises(CorruptCheckpoint, match="n_embd"):
        from_table({**data, "n_embd": "128"})


# --------------------------------------------------------------------------- the plan from either source


def _plan_summary(plan):
    return (
        plan.model_class, plan.model_type, plan.is_encoder_decoder, plan.ignore, plan.warnings,
        [(e.source.name, e.name, str(e.action), e.reason, e.out_dtype, e.layout, e.block_size, e.tied_to,
          [(o.name, o.dtype, tuple(o.shape)) for o in e.outputs]) for e in plan.entries],
        [(s.filename, [e.name for e in s.entries]) for s in plan.shards],
    )


# legacy key layouts exist for BLOOM and T5 only
PLAN_CASES = [(a, "safetensors") for a in TABLE_ARCHS] + [(a, "safetensors-legacy") for a in TABLE_ARCHS if a in ("bloom", "t5")]


@pytest.mark.parametrize(("arch", "form"), PLAN_CASES)
def test_the_plan_from_the_table_equals_the_plan_from_the_meta_model(arch, form, tmp_path):
    from models import make_tiny

    from int8.architectures import Config
    from int8.checkpoint import CheckpointReader, find_checkpoint
    from int8.conversion.plan import make_plan
    from int8.hf import load_config

    src = make_tiny(arch, tmp_path / arch, form=form, tokenizer=False)
    data = json.loads((src / "config.json").read_text())
    with CheckpointReader(find_checkpoint(src)) as reader:
        kw = dict(block_size=128, dtype="BF16", skip=["re:.*\\.1\\..*"], max_shard_size=400_000, same_data=lambda a, b: True)
        for embeddings in ("keep", "int8"):
            fast = make_plan(Config(data, src), reader.tensors, embeddings=embeddings, **kw)
            slow = make_plan(load_config(src), reader.tensors, embeddings=embeddings, **kw)
            assert _plan_summary(fast) == _plan_summary(slow), embeddings


@pytest.mark.parametrize("arch", ["gptj", "t5"])
def test_converting_a_table_architecture_on_cpu_imports_neither_torch_nor_transformers(tmp_path, arch):
    """The CPU path over safetensors is numpy and numba only: torch, transformers and compressed-tensors
    (seconds of imports together) stay out of the process, by the API and by the CLI."""
    import subprocess
    import sys

    from models import make_tiny

    from int8 import kernels
    from int8.hf import gpu_possible

    heavy = ("compressed_tensors", "transformers") + (("torch",) if kernels.available() else ())
    src = make_tiny(arch, tmp_path / "src", tokenizer=False)
    report = f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    api = f"import sys, int8\nint8.convert({str(src)!r}, {str(tmp_path / 'api')!r}, device='cpu')\n" + report
    device = "auto" if not gpu_possible() else "cpu"
    cli = (
        "import sys\nfrom int8.cli import app\n"
        f"try:\n    app([\"convert\", {str(src)!r}, \"--out\", {str(tmp_path / 'cli')!r}, \"--device\", {device!r}, \"--quiet\"])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n" + report
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(int8_src()).parent)}
    for code, out_dir in ((api, "api"), (cli, "cli")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "[]", out_dir
        assert (tmp_path / out_dir / "config.json").is_file()


def int8_src() -> str:
    import int8

    return int8.__file__.rsplit("/", 1)[0]


def test_the_command_defers_garbage_collection_for_its_start_only():
    """`int8` starts with the cyclic collector off (the imports' objects live as long as the process) and
    turns it back on by itself: a long command must not run without it."""
    import gc
    import time

    from int8.cli import _defer_garbage_collection

    assert gc.isenabled()
    try:
        _defer_garbage_collection(0.05)
        assert not gc.isenabled()
        deadline = time.monotonic() + 10
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.isenabled()
    finally:
        gc.enable()
