"""The structure and integrity checks, by subject; each a function of the `Layout` (and the data scan).

* `files`: ``contained``, ``report``, ``sha256`` (the manifest), ``files`` (what push would upload);
* `config`: ``config``, ``index``, ``tensors``;
* `data`: ``codes``, ``scales``, ``finite`` (from the data scan);
* `tokenizer`, `card`: the checks of the same names;
* `provenance`: those checks as they apply to another tool's checkpoint, or to int8's with its report removed.

`int8.verify.structure.check_structure` runs them in order.
"""
