"""`int8 verify`: prove that a converted checkpoint is whole and faithful.

Three groups of checks, each only when the one before leaves something to check:

1. structure and integrity (`int8.verify.structure`; all that ``quick=True`` runs):
   the small files read once into a frozen `int8.verify.layout.Layout`, the
   shards' data scanned once (`int8.verify.scan`), and the checks of
   `int8.verify.checks` run on both: config, index, tensor layout, codes,
   scales, NaN/Inf, SHA-256 manifest, tokenizer, card, as they apply to who
   wrote it (`int8.verify.provenance`: int8, or another tool such as
   llm-compressor, whose checkpoints skip the checks of int8's own files);
2. loading (`int8.verify.phases`, building models with `int8.verify.models`):
   stock transformers with compressed-tensors loads it and a forward pass
   gives finite logits;
3. fidelity against the original (`int8.verify.phases`, `int8.verify.fidelity`):
   every tensor's reconstruction error, then top-1 agreement, KL divergence
   and perplexity on a text sample, relative to ideal int8 rounding noise.

The library API::

    from int8.verify import verify_checkpoint

    result = verify_checkpoint("gpt-j-6b-int8")          # or quick=True, against=..., text=...
    result.passed                                        # no check failed
    result.failures                                      # the checks that failed, with detail
    result.to_dict()                                     # the int8.verify/1 report
"""

from .core import verify_checkpoint
from .result import SCHEMA, VERIFY_NAME, Check, Thresholds, VerifyResult

__all__ = ["SCHEMA", "VERIFY_NAME", "Check", "Thresholds", "VerifyResult", "verify_checkpoint"]
