"""`int8 convert`, stage by stage.

    api       the orchestrator: resolve the source, plan, stream, write index/config/side files, report, card
    plan      what becomes of every tensor (quantize, keep, drop) and the exact layout of every output shard
    engine    worker threads quantizing row chunks in place, a writer appending them to the shards in plan order
    writer    the shard files: preallocated, appended front to back, hashed on their own thread
    reporting the conversion report of a finished run (int8_report.json)
    output    the output folder: staging beside it, ownership of what --overwrite replaces, the exclusive swap

Nothing here is imported by `int8.verify` or `int8.runtime`: what they share with conversion lives in
`int8.hf` (model knowledge), `int8.formats` (file formats), `int8.checkpoint` (reading sources) and
`int8.quantize` (the math).
"""
