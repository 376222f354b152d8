"""`int8 generate`: a thin layer over `int8.runtime.generate.run_generate`."""

import sys
from typing import Annotated, Optional

import typer

from .. import options
from .option_types import device_option, revision_option

Device = device_option("auto, cpu, cuda or cuda:N.")
Revision = revision_option("Hub revision (branch, tag or commit); not for a local folder.")


def generate(
    model: Annotated[str, typer.Argument(help="An int8 checkpoint: a folder `int8 convert` wrote, or a Hub repo id.")],
    prompt: Annotated[str, typer.Argument(help="The text to continue (for T5-style models: the input text).")],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="How many tokens to generate (at least 1).", callback=options.max_new_tokens)
    ] = 50,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0 for greedy decoding; above 0 samples.", callback=options.temperature)
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling threshold, above 0 and at most 1 (with --temperature).",
                            callback=options.top_p)
    ] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")] = None,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: auto, fp32, bf16 or fp16.")] = "auto",
    revision: Revision = None,
) -> None:
    """Generate text from an int8 checkpoint, streaming tokens as they come.

    The checkpoint is loaded with `int8.load` (its weights stay int8 in memory) and PROMPT is continued.

    Example:

    `int8 generate flan-t5-small-int8 "Translate to German: Hello" -n 20`
    """
    from ..runtime.generate import run_generate

    run_generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                 device=device, dtype=dtype, revision=revision, stream=sys.stdout)
