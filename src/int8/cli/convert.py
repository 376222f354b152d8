"""`int8 convert`: a thin layer over `int8.conversion.api.convert` (and `int8 push` after it with --push)."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from .. import options
from ..blocks import DEFAULT_BLOCK_SIZE
from .display import RichProgress, console, size
from .option_types import device_option, dtype_option, embeddings_option, quiet_option, revision_option
from .push import publish

if TYPE_CHECKING:
    from ..report import ConversionReport

Device = device_option("Where to quantize: auto (GPU if any), cpu, cuda, cuda:N.")
Revision = revision_option("Hub branch, tag or commit of the source (not for a local folder).")
Quiet = quiet_option("No progress or summary; errors only.")
ScaleDtype = dtype_option(
    "--scale-dtype",
    "dtype of the weight scales (one per block): fp32, fp16 or bf16. Default: the preset's, else fp32. "
    "Stock loaders (transformers with compressed-tensors, vLLM) compute each weight as code x scale in the "
    "scale's dtype: with bf16 scales that product is rounded a second time (errors up to ~1 scale instead of "
    "0.5), which measurably raises the KL divergence of real models; fp32 scales cost about 6% more bytes of "
    "quantized weights at block 32 (1.5% at 128).",
)

Embeddings = embeddings_option(
    "keep (default): token embeddings and the output head stay unquantized, in --dtype. int8: quantize them too, "
    "in blocks along the embedding dimension (a tied head shares the embedding's codes): much smaller for large "
    "vocabularies, but only int8.load runs it as is; stock transformers loads it only with "
    "CompressedTensorsConfig(dequantize=True) and one block size; vLLM cannot.",
)


def epilog() -> str:
    """The presets, under the options of `int8 convert --help`."""
    from ..presets import preset_names

    return f"Presets: {', '.join(preset_names())}. `int8 presets` describes them."


def _format_option(ctx: typer.Context, value: str) -> str:
    """--format, checked against --block-size/--scale-dtype when those were parsed first (`_not_for_bnb` otherwise)."""
    fmt = options.output_format(value)
    options.format_allows(fmt, block_size=ctx.params.get("block_size"), scale_dtype=ctx.params.get("scale_dtype"),
                          embeddings=ctx.params.get("embeddings"))
    return fmt.value


def _not_for_bnb(option: str):
    """A callback refusing ``option`` when --format bnb was parsed before it."""

    def check(ctx: typer.Context, value):
        if value is not None and ctx.params.get("format") is not None:
            options.format_allows(ctx.params["format"], **{option: value})
        return value

    return check


def _checked_size(value: str) -> str:
    options.shard_size(value)
    return value


def convert(
    source: Annotated[str, typer.Argument(help="A preset name (`int8 presets`), a Hub repo id (owner/name), or a local folder.")],
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output folder. Default: `./NAME-int8`.", show_default=False,
                     callback=lambda v: None if v is None else options.output_folder(v)),
    ] = None,
    block_size: Annotated[
        Optional[int],
        typer.Option(
            "--block-size",
            min=1,
            help="Values per absmax scale, along each row (input dimension): the preferred (largest) size; a layer "
            "whose input width it does not divide gets the largest of 128, 64, 32 below it that does. "
            f"Default: the preset's, else {DEFAULT_BLOCK_SIZE} (128 takes about 8% fewer bytes, at a measurably "
            "higher KL divergence on real models). vLLM's int8 kernels take 32, 64 or 128. "
            "Not with --format bnb (one scale per row).",
            show_default=False,
            callback=_not_for_bnb("block_size"),
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="dtype of everything not quantized (embeddings, norms, biases, kept layers): fp16, bf16 or fp32; "
            "not of the scales (see --scale-dtype). "
            "Default: the preset's (bf16 for T5-family models, which overflow in fp16), else bf16.",
            show_default=False,
        ),
    ] = None,
    scale_dtype: ScaleDtype = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Output layout: compressed-tensors (block-wise absmax, pack-quantized: transformers with "
            "compressed-tensors, vLLM) or bnb (transformers' bitsandbytes load_in_8bit layout: row-wise LLM.int8, "
            "int8 weight + float32 SCB per row; loads as Linear8bitLt, trains LoRA with PEFT).",
            callback=_format_option,
            metavar="compressed-tensors|bnb",
        ),
    ] = "compressed-tensors",
    device: Device = "auto",
    skip: Annotated[
        Optional[list[str]],
        typer.Option(
            "--skip",
            help="Keep modules matching PATTERN unquantized (repeatable): a module name or one of its dotted parts "
            "(`lm_head`, `mlp.fc_in`), a glob (`*.attn.*`), or `re:REGEX`. lm_head and the model class's fp32 modules "
            "are always kept. A pattern that matches nothing is warned about.",
            metavar="PATTERN",
            callback=options.skip_patterns,
        ),
    ] = None,
    embeddings: Embeddings = "keep",
    revision: Revision = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB or 500MB.", callback=_checked_size)
    ] = "5GB",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --out if it holds an earlier int8 output and nothing else "
                     "(a folder with other files in it is never replaced)."),
    ] = False,
    push: Annotated[
        Optional[str],
        typer.Option("--push", help="After converting, publish to this Hub repo (as `int8 push` does).", metavar="REPO_ID"),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Convert a checkpoint to int8: linear weights in int8 blocks with absmax scales (in --scale-dtype), the rest in --dtype.

    The output is a compressed-tensors `pack-quantized` folder that plain transformers loads
    (with `pip install compressed-tensors`) and vLLM serves, plus a model card and a
    conversion report (`int8_report.json`). Memory stays flat: a 24 GB model converts in a few GB of RAM.
    With `--format bnb` it is transformers' bitsandbytes `load_in_8bit` layout instead (int8 weight and a
    float32 SCB per row), which plain transformers + bitsandbytes loads into Linear8bitLt layers.

    Examples:

    `int8 convert gpt-j-6b`

    `int8 convert bigscience/bloomz-560m --out bloomz-int8 --dtype fp16`

    `int8 convert ./my-model --block-size 64 --skip "re:.*\\.attn\\..*"`

    `int8 convert ./my-model --skip lm_head --skip "*.mlp.fc_out"`

    `int8 convert gpt-j-6b --format bnb` (transformers' bitsandbytes 8-bit layout)
    """
    from ..conversion.api import convert as run_convert
    from ..conversion.api import default_output

    options.local_revision(source, revision)
    folder = out_dir if out_dir is not None else default_output(source)
    if push:
        from ..hub.upload import check_can_push

        check_can_push(push)  # a missing token or a malformed repo id fails now, not after the conversion
    warned: list[str] = []

    def warn(message: str) -> None:  # as soon as it is known: before the long work
        warned.append(message)
        console.print(f"[yellow]Warning:[/] {message}", markup=True, highlight=False)

    report = run_convert(
        source,
        folder,
        block_size=block_size,
        dtype=dtype,
        scale_dtype=scale_dtype,
        device=device,
        skip=skip or (),
        embeddings=embeddings,
        revision=revision,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=None if quiet else RichProgress("Converting"),
        quiet=quiet,
        on_warning=warn,
        format=format,
    )
    for w in report.warnings:
        if w not in warned:
            warn(w)
    if not quiet:
        console.print(summary(report, folder))
    if push:
        publish(folder, push, quiet=quiet)


def summary(report: "ConversionReport", folder: Path) -> Table:
    """The table `int8 convert` ends with: source, model, sizes, tensors, time and the output folder."""
    from ..formats.bitsandbytes import is_report_format

    t = report.totals
    table = Table(title="int8 convert", show_header=False, title_justify="left")
    table.add_column()
    table.add_column(overflow="fold")  # a long output path wraps whole, never cut with an ellipsis
    table.add_row("source", report.source.id + (f" @ {report.source.commit[:12]}" if report.source.commit else ""))
    table.add_row("model", f"{report.model.architecture} ({report.model.model_type})")
    table.add_row("size in", size(t.bytes_in))
    table.add_row("size out", size(t.bytes_out))
    table.add_row("ratio", f"{t.ratio:.2f}x")
    table.add_row("tensors", f"{t.tensors_quantized} quantized, {t.tensors_kept} kept, {t.tensors_dropped} dropped")
    if is_report_format(report.quantization.format):
        table.add_row("format", f"bitsandbytes int8, one float32 scale per row ({t.tensors_quantized} layers)")
    else:
        table.add_row("blocks", ", ".join(f"{g.block_size} ({g.layers} layers)" for g in report.quantization.block_groups))
    if report.quantized_embeddings:
        from ..formats.compressed_tensors import EMBEDDING_LOADERS

        table.add_row("embeddings", f"int8 ({', '.join(report.quantized_embeddings)}); loaders: "
                      + "; ".join(f"{k} {v}" for k, v in EMBEDDING_LOADERS.items()))
    table.add_row("time", f"{t.seconds:.1f} s on {t.device} ({t.stream_seconds:.1f} s streaming tensors)")
    table.add_row("throughput", f"{t.throughput_gb_s:.2f} GB/s of input while streaming")
    table.add_row("output", str(folder))
    return table
