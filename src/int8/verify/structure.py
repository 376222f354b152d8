"""The structure and integrity checks: everything `int8 verify --quick` does. No model is built.

The data of the shards is read once (`int8.verify.scan`: hashing and value
checks together), so the time scales with the bytes on disk. Everything else
is small: the JSON files, the safetensors headers, a model built on the
``meta`` device from config.json (the tensor names and shapes transformers
expects), the tokenizer and the card.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import CorruptCheckpoint, UnsafePath
from ..formats.compressed_tensors import check_config, is_ignored, packed_columns
from ..formats.safetensors import FLOAT_DTYPES, read_index, scan_safetensors_header
from ..hf import FROM_TORCH_NAME, out_in, weight_layout
from ..paths import inside, links_outside, plain, show
from ..quantize import QMAX
from ..report import REPORT_NAME, ConversionReport
from ..report import SCHEMA as REPORT_SCHEMA
from .layout import Layout, QuantLayer, StoredTensor
from .result import VERIFY_NAME, Check, outcome, skipped
from .scan import ShardScan, scan_all, sha256_file

__all__ = ["BLOCKING", "Layout", "QuantLayer", "StoredTensor", "check_structure", "load_tokenizer"]

INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
NOT_IN_MANIFEST = {CARD_NAME, REPORT_NAME, VERIFY_NAME}
"""Files that legitimately change after conversion, so the manifest leaves them out."""
LOAD_AFFECTING = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".py", ".gguf")
"""Files outside the manifest with these endings fail the integrity check (they change what loads)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)
_MAX_HEADER = 100 * 1024 * 1024

BLOCKING = ("config", "index", "tensors", "contained")
"""Checks that, when they fail, make the model-level checks meaningless (the tensors cannot be trusted to load)."""


# --------------------------------------------------------------------------- small files


def _check_report(folder: Path) -> tuple[Check, ConversionReport | None]:
    path = folder / REPORT_NAME
    threshold = f"present, schema {REPORT_SCHEMA}"
    if not path.is_file():
        return outcome("report", [f"{REPORT_NAME} is missing: there is no manifest to check the files against"],
                       figure="missing", threshold=threshold), None
    try:
        data = json.loads(path.read_text())
        report = ConversionReport.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        return outcome("report", [f"{REPORT_NAME} is not a valid conversion report ({type(e).__name__}: {e})"],
                       figure="unreadable", threshold=threshold), None
    problems = []
    if data.get("schema") != REPORT_SCHEMA:
        problems.append(f"{REPORT_NAME} has schema {data.get('schema')!r}, not {REPORT_SCHEMA!r}")
    if not report.files:
        problems.append(f"{REPORT_NAME} lists no files")
    figure = f"int8 {report.int8_version}, {len(report.files)} files, {len(report.quantized)} quantized tensors"
    return outcome("report", problems, figure=figure, threshold=threshold), report


def _check_config(folder: Path, layout: Layout, report: ConversionReport | None):
    """config.json and its quantization_config; returns (check, meta model or None)."""
    threshold = "pack-quantized, 8-bit symmetric int, one group size; transformers builds it"
    path = folder / "config.json"
    problems: list[str] = []
    if not path.is_file():
        return outcome("config", ["config.json is missing"], figure="missing", threshold=threshold), None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return outcome("config", [f"config.json is not valid JSON ({e})"], figure="unreadable", threshold=threshold), None
    layout.config = config
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        problems.append("config.json has no quantization_config: this is not a quantized checkpoint")
        group_size = None
    else:
        qcheck = check_config(qc)
        problems += qcheck.problems
        group_size = qcheck.group_size
    if report is not None and group_size is not None and group_size != report.quantization.block_size:
        problems.append(
            f"config.json: quantization_config group_size {group_size} disagrees with the block size "
            f"{report.quantization.block_size} in {REPORT_NAME}"
        )
    layout.block_size = group_size
    dtype = config.get("dtype") or config.get("torch_dtype")
    layout.scale_dtype = FROM_TORCH_NAME.get(str(dtype))
    if dtype is not None and layout.scale_dtype is None:
        problems.append(f"config.json: dtype {dtype!r} is not float32, float16 or bfloat16")
    meta = None
    try:
        meta = _meta_model(folder)
        layout.model_class = type(meta).__name__
        layout.model_keys = frozenset(meta.state_dict(keep_vars=True))
        layout.base_prefix = getattr(meta, "base_model_prefix", "") or ""
        layout.tied = dict(getattr(meta, "all_tied_weights_keys", None) or {})
        layout.model_type = meta.config.model_type
        layout.seq2seq = bool(getattr(meta.config, "is_encoder_decoder", False))
    except Exception as e:  # transformers' own errors: the config is what is wrong
        problems.append(f"transformers cannot build a model from config.json: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    figure = (
        f"{layout.model_class or '?'}, group size {group_size}, scales in {dtype}"
        if not problems
        else f"{len(problems)} problem(s)"
    )
    return outcome("config", problems, figure=figure, threshold=threshold), meta


def _meta_model(folder: Path):
    from ..hf import build_meta_model, load_config

    config = load_config(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return build_meta_model(config)


# --------------------------------------------------------------------------- index and headers


def _read_header(path: Path, problems: list[str]) -> tuple[list[StoredTensor], int, int] | None:
    """Parse a shard's safetensors header; return (tensors by offset, data start, bytes present)."""
    tensors, start, found = scan_safetensors_header(path)
    problems.extend(found)
    if not start:
        return None
    return [StoredTensor(t.name, t.dtype, t.shape, path, t.offset, t.nbytes) for t in tensors], start, path.stat().st_size


def _check_index(folder: Path, layout: Layout) -> tuple[Check, list[Path]]:
    threshold = "index and shard headers agree, tensor by tensor"
    problems: list[str] = []
    index_path = folder / INDEX_NAME
    shards: list[Path] = []
    if not index_path.is_file() and not index_path.is_symlink():
        loose = sorted(p.name for p in folder.glob("*.safetensors"))
        problems.append(f"{INDEX_NAME} is missing" + (f" (shards present: {', '.join(loose[:4])})" if loose else ""))
        return outcome("index", problems, figure="missing", threshold=threshold), shards
    try:
        inside(folder, INDEX_NAME, what="index")
        weight_map = read_index(index_path)
        index = json.loads(index_path.read_bytes())
    except CorruptCheckpoint as e:
        problems.append(e.message)
        return outcome("index", problems, figure="unreadable", threshold=threshold), shards
    listed = sorted(set(weight_map.values()))
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    for name in sorted(on_disk - set(listed)):
        problems.append(f"{name} is a shard on disk that {INDEX_NAME} does not list")
    located: dict[str, StoredTensor] = {}
    unsafe: set[str] = set()
    for fname in listed:
        try:
            path = inside(folder, fname, what=f"shard listed in {INDEX_NAME}")
        except UnsafePath as e:
            problems.append(e.message)
            unsafe.add(fname)
            continue
        if not path.is_file():
            problems.append(
                f"{INDEX_NAME} lists shard {plain(fname)}, which is missing ({sum(v == fname for v in weight_map.values())} tensors)"
            )
            continue
        shards.append(path)
        parsed = _read_header(path, problems)
        if parsed is None:
            continue
        tensors, _, _ = parsed
        for t in tensors:
            if t.name in located:
                problems.append(f"tensor {show(t.name)} is stored twice: in {located[t.name].file.name} and in {plain(fname)}")
            located[t.name] = t
            where = weight_map.get(t.name)
            if where is None:
                problems.append(f"{plain(fname)} holds tensor {show(t.name)}, which {INDEX_NAME} does not list")
            elif where != fname:
                problems.append(f"{plain(fname)} holds tensor {show(t.name)}, which {INDEX_NAME} places in {plain(where)}")
    for tname, fname in weight_map.items():
        t = located.get(tname)
        if fname not in unsafe and (folder / fname).is_file() and (t is None or t.file != folder / fname):
            if t is None:
                problems.append(f"{INDEX_NAME} says tensor {show(tname)} is in {plain(fname)}, but it is not there (nor in any shard)")
            else:
                problems.append(f"{INDEX_NAME} says tensor {show(tname)} is in {plain(fname)}, but it is in {t.file.name}")
    total = (index.get("metadata") or {}).get("total_size")
    data_bytes = sum(t.nbytes for t in located.values())
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total != data_bytes):
        shown = total if isinstance(total, int) else "not an integer"
        problems.append(f"{INDEX_NAME}: metadata.total_size is {shown}, but the shards hold {data_bytes} bytes of tensors")
    layout.tensors = located
    figure = f"{len(shards)} shard(s), {len(located)} tensors"
    return outcome("index", problems, figure=figure, threshold=threshold), shards


# --------------------------------------------------------------------------- tensors against the config


def _plan_layers(layout: Layout, meta, problems: list[str]) -> None:
    """Pair each weight_packed with its scale and shape; check shapes and dtypes against the config."""
    import re

    tensors = layout.tensors
    qc = (layout.config or {}).get("quantization_config") or {}
    ignore = check_config(qc).ignore  # the well-formed entries (the config check reports the rest)
    gs = layout.block_size
    params = {k: tuple(v.shape) for k, v in meta.state_dict(keep_vars=True).items()}
    modules = dict(meta.named_modules())
    cls = type(meta).__name__

    def ignored(module: str) -> bool:
        return is_ignored(module, type(modules.get(module)).__name__, ignore)

    def where(t: StoredTensor) -> str:
        return f"{t.file.name}: {t.name}"

    for name, t in sorted(tensors.items()):
        if not name.endswith(".weight_packed"):
            continue
        mod = name[: -len(".weight_packed")]
        scale = tensors.get(f"{mod}.weight_scale")
        shape_t = tensors.get(f"{mod}.weight_shape")
        if scale is None:
            problems.append(f"{where(t)} has no {mod}.weight_scale beside it in any shard")
        if shape_t is None:
            problems.append(f"{where(t)} has no {mod}.weight_shape beside it in any shard")
        if f"{mod}.weight" in tensors:
            problems.append(f"{mod} is stored both quantized and as a plain {mod}.weight")
        kind = weight_layout(modules.get(mod))
        if kind is None:
            problems.append(f"{where(t)}: {mod} is not a linear layer of {cls} built from config.json")
            continue
        if ignored(mod):
            problems.append(f"{where(t)}: {mod} is quantized but quantization_config.ignore lists it")
        expected = params.get(f"{mod}.weight")
        if expected is None or len(expected) != 2:
            problems.append(f"{where(t)}: {cls} has no 2-D weight for {mod}")
            continue
        out_f, in_f = out_in(expected, kind)
        if t.dtype != "I32":
            problems.append(f"{where(t)} is {t.dtype}, not I32 (four packed int8 codes per int32)")
        elif t.shape != (out_f, packed_columns(in_f)):
            problems.append(
                f"{where(t)} has shape {list(t.shape)}, but the weight {cls} built from config.json expects is "
                f"[{out_f}, {in_f}], packed as [{out_f}, {packed_columns(in_f)}]"
            )
        if scale is not None:
            if scale.dtype not in FLOAT_DTYPES:
                problems.append(f"{where(scale)} is {scale.dtype}, not a floating dtype")
            elif layout.scale_dtype and scale.dtype != layout.scale_dtype:
                problems.append(f"{where(scale)} is {scale.dtype}, but config.json's dtype is {layout.scale_dtype}")
            if gs:
                want = (out_f, math.ceil(in_f / gs))
                if in_f % gs:
                    problems.append(f"{where(t)}: {in_f} input features are not a multiple of the group size {gs}")
                if scale.shape != want:
                    problems.append(
                        f"{where(scale)} has shape {list(scale.shape)}, but group size {gs} (config.json) over "
                        f"[{out_f}, {in_f}] needs {list(want)}"
                    )
        if shape_t is not None and (shape_t.dtype != "I64" or shape_t.shape != (2,)):
            problems.append(f"{where(shape_t)} is {shape_t.dtype} {list(shape_t.shape)}, not I64 [2]")
        if scale is not None:
            layout.quantized[mod] = QuantLayer(mod, out_f, in_f, kind, t, scale, shape_t)

    tied = dict(getattr(meta, "all_tied_weights_keys", None) or {})
    skip_missing = [re.compile(p) for p in (getattr(meta, "_keys_to_ignore_on_load_missing", None) or [])]
    quantized_weights = {f"{m}.weight" for m in layout.quantized} | {
        f"{n[: -len('.weight_packed')]}.weight" for n in tensors if n.endswith(".weight_packed")
    }
    for mod_name, module in modules.items():
        if weight_layout(module) and f"{mod_name}.weight" in params and f"{mod_name}.weight" not in quantized_weights:
            if not ignored(mod_name) and f"{mod_name}.weight" in tensors:
                problems.append(
                    f"{tensors[f'{mod_name}.weight'].file.name}: {mod_name}.weight is stored unquantized but "
                    "quantization_config.ignore does not list it (compressed-tensors would expect it packed)"
                )
    for name, shape in params.items():
        if name in quantized_weights:
            continue
        t = tensors.get(name)
        if t is None:
            source = tied.get(name)
            if source is not None and (source in tensors or source in quantized_weights):
                continue
            if any(p.search(name) for p in skip_missing):
                continue
            problems.append(f"tensor {name!r}, which {cls} needs, is in no shard")
            continue
        if t.shape != shape:
            problems.append(f"{where(t)} has shape {list(t.shape)}, but {cls} built from config.json expects {list(shape)}")
        if t.dtype in FLOAT_DTYPES and layout.scale_dtype and t.dtype not in (layout.scale_dtype, "F32"):
            problems.append(f"{where(t)} is {t.dtype}, but config.json's dtype is {layout.scale_dtype}")
    known = set(params) | {n for q in layout.quantized.values() for n in (q.packed.name, q.scale.name)}
    known |= {f"{m}.weight_shape" for m in layout.quantized}
    for name, t in sorted(tensors.items()):
        if name not in known and not name.endswith((".weight_packed", ".weight_scale", ".weight_shape")):
            problems.append(f"{where(t)} is not a tensor of {cls} (transformers would report it as unexpected)")


# --------------------------------------------------------------------------- integrity, tokenizer, card


def _check_manifest(folder: Path, report: ConversionReport | None, scans: dict[Path, ShardScan]) -> Check:
    threshold = "every file as in the manifest; no unlisted weight or config file"
    if report is None:
        return outcome("sha256", [f"no manifest: {REPORT_NAME} is missing or unreadable"], figure="no manifest",
                       threshold=threshold)
    problems = []
    hashed = {p: s for p, s in scans.items()}
    ok = 0
    for entry in report.files:
        try:
            path = inside(folder, entry.name, what=f"file in the manifest of {REPORT_NAME}")
        except UnsafePath as e:
            problems.append(e.message)
            continue
        if not path.is_file():
            problems.append(f"{plain(entry.name)} is in the manifest but missing from the folder")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            said = entry.bytes if isinstance(entry.bytes, int) else "a non-number"
            problems.append(f"{plain(entry.name)} has {size} bytes, the manifest says {said}")
            continue
        scan = hashed.get(path)
        digest = scan.sha256 if scan is not None and scan.sha256 else sha256_file(path)
        if digest != entry.sha256:
            problems.append(
                f"{plain(entry.name)}: SHA-256 {digest[:16]}... differs from the manifest's {show(entry.sha256, 16)}: "
                "its bytes changed after conversion"
            )
            continue
        ok += 1
    listed = {e.name for e in report.files}
    extra = sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in listed and p.name not in NOT_IN_MANIFEST
    )
    for name in links_outside(folder):
        problems.append(f"{plain(name)} is a link to a file outside the folder: int8 does not read it, nor may it be published")
    for name in extra:
        if name.endswith(LOAD_AFFECTING):
            problems.append(f"{name} is not in the manifest: it was added after conversion and changes what loads")
    figure = f"{ok}/{len(report.files)} files match"
    harmless = [n for n in extra if not n.endswith(LOAD_AFFECTING)]
    if harmless:
        figure += f" (not in the manifest, ignored: {', '.join(harmless[:3])})"
    return outcome("sha256", problems, figure=figure, threshold=threshold)


def _check_files(folder: Path, report: ConversionReport | None) -> Check:
    """Every file push would upload is in the manifest (or is the card, the report or the verify record)."""
    threshold = "every file push would upload is in the manifest (README.md, int8_report.json, int8_verify.json apart)"
    from ..hub.upload import pushed_files

    pushed = pushed_files(folder)
    if report is None:
        return outcome("files", [f"no manifest: {REPORT_NAME} is missing or unreadable"], figure="no manifest",
                       threshold=threshold)
    listed = {e.name for e in report.files}
    extra = [n for n in pushed if n not in listed and n not in NOT_IN_MANIFEST]
    problems = [
        f"{n} is not in the manifest: verify cannot vouch for it, and push would publish it (remove it, or convert again)"
        for n in extra
    ]
    return outcome("files", problems, figure=f"{len(pushed)} files, {len(extra)} outside the manifest", threshold=threshold)


def load_tokenizer(folder: Path):
    from ..hf import load_tokenizer as hf_tokenizer

    return hf_tokenizer(folder)


def _check_tokenizer(folder: Path, layout: Layout, report: ConversionReport | None) -> Check:
    threshold = "AutoTokenizer loads it; ids within the vocabulary"
    listed = [e.name for e in report.files] if report else []
    missing = [n for n in listed if (n in TOKENIZER_FILES or n.startswith("tokenizer")) and not (folder / n).is_file()]
    problems = [f"{n} (a tokenizer file in the manifest) is missing" for n in missing]
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        problems.append(f"{folder.name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    try:
        tok = load_tokenizer(folder)
    except Exception as e:  # any failure to load is the finding
        present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        problems.append(
            f"the tokenizer does not load from {folder.name} ({msg[:200]}); tokenizer files present: "
            + (", ".join(present) or "none")
        )
        return outcome("tokenizer", problems, figure="does not load", threshold=threshold)
    from .sample import DEFAULT_TEXT

    ids = tok(DEFAULT_TEXT[:400], add_special_tokens=False)["input_ids"]
    vocab = (layout.config or {}).get("vocab_size")
    if not ids:
        problems.append("the tokenizer turns the sample text into no tokens")
    elif isinstance(vocab, int) and max(ids) >= vocab:
        problems.append(f"the tokenizer yields token id {max(ids)}, beyond config.json's vocab_size {vocab}")
    figure = f"{type(tok).__name__}, {len(tok)} tokens"
    return outcome("tokenizer", problems, figure=figure, threshold=threshold)


def _check_card(folder: Path, report: ConversionReport | None) -> Check:
    threshold = "README.md metadata: transformers, int8 tag, base_model"
    path = folder / CARD_NAME
    if not path.is_file():
        return outcome("card", [f"{CARD_NAME} (the model card) is missing"], figure="missing", threshold=threshold)
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception as e:  # an unparseable card is the finding
        return outcome("card", [f"{CARD_NAME} does not parse as a model card ({e})"], figure="unreadable",
                       threshold=threshold)
    problems = []
    if not data:
        problems.append(f"{CARD_NAME} has no metadata block")
    if data and data.get("library_name") != "transformers":
        problems.append(f"{CARD_NAME}: library_name is {data.get('library_name')!r}, not 'transformers'")
    tags = data.get("tags") or []
    if data and "int8" not in tags:
        problems.append(f"{CARD_NAME}: tags {tags} lack 'int8'")
    if data and not data.get("pipeline_tag"):
        problems.append(f"{CARD_NAME} has no pipeline_tag")
    base = None
    if report is not None:
        from ..hub.card import base_model_id

        base = base_model_id(report)
    if base and data.get("base_model") != base:
        problems.append(f"{CARD_NAME}: base_model is {data.get('base_model')!r}, but the checkpoint was converted from {base}")
    if data.get("base_model") and data.get("base_model_relation") != "quantized":
        problems.append(f"{CARD_NAME}: base_model_relation is {data.get('base_model_relation')!r}, not 'quantized'")
    figure = f"base_model {data.get('base_model')}" if data.get("base_model") else "metadata present"
    return outcome("card", problems, figure=figure, threshold=threshold)


# --------------------------------------------------------------------------- all of it


STRUCTURE_CHECKS = ("report", "config", "index", "tensors", "codes", "scales", "finite", "sha256", "files", "tokenizer",
                    "card")
"""The checks after ``contained``, in the order they run."""


def _check_contained(folder: Path) -> Check:
    """No symlink in the folder leads outside it (`int8.paths`): the one check run before any file is read."""
    outside = links_outside(folder)
    problems = [f"{plain(n)} is a link to a place outside the folder" for n in outside]
    return outcome("contained", problems, figure=f"{len(outside)} links outside",
                   threshold="every file inside the folder after resolving links")


def check_structure(folder: Path, *, workers: int | None = None) -> tuple[list[Check], Layout]:
    """Run every structure and integrity check on a converted folder; return the checks and the layout."""
    import time

    started = time.perf_counter()
    folder = Path(folder)
    layout = Layout(folder)
    contained = _check_contained(folder)
    if contained.failed:  # a link out of the folder: nothing in it is read, so nothing outside can be
        why = "a file of the folder links outside it, so nothing was read"
        return [contained, *(skipped(n, why, group="structure") for n in STRUCTURE_CHECKS)], layout
    report_check, report = _check_report(folder)
    layout.report = report
    config_check, meta = _check_config(folder, layout, report)
    index_check, shards = _check_index(folder, layout)

    tensor_problems: list[str] = []
    if meta is not None and layout.tensors:
        _plan_layers(layout, meta, tensor_problems)
    elif meta is None:
        tensor_problems.append("not checked: config.json does not give the model's tensors")
    scan_started = time.perf_counter()
    scans = scan_all(shards, layout, workers)
    layout.scan_seconds = time.perf_counter() - scan_started
    code_problems, scale_problems, finite_problems = [], [], []
    shapes: dict[str, list[int]] = {}
    for path in shards:
        s = scans[path]
        code_problems += s.codes
        scale_problems += s.scales
        finite_problems += s.finite
        shapes.update(s.shapes)
        if s.error and not any(path.name in p for p in index_check.problems):
            tensor_problems.append(s.error)
    for q in layout.quantized.values():
        if q.shape is not None and q.shape.name in shapes:
            got = shapes[q.shape.name]
            if got != [q.out_features, q.in_features]:
                tensor_problems.append(
                    f"{q.shape.file.name}: {q.shape.name} says {got}, but {layout.model_class} built from config.json "
                    f"expects [{q.out_features}, {q.in_features}]"
                )
    n_layers = len(layout.quantized)
    tensors_check = outcome(
        "tensors",
        tensor_problems,
        figure=f"{n_layers} quantized layers, {len(layout.kept)} other tensors",
        threshold="packed, scale, shape per layer; shapes and dtypes as config.json implies",
    )
    n_codes = sum(s.n_codes for s in scans.values())
    n_scales = sum(s.n_scales for s in scans.values())
    n_float = sum(s.n_float for s in scans.values())
    lo = min((s.scale_min for s in scans.values()), default=math.inf)
    hi = max((s.scale_max for s in scans.values()), default=-math.inf)
    checks = [
        contained,
        report_check,
        config_check,
        index_check,
        tensors_check,
        outcome("codes", code_problems, figure=f"{n_codes:,} codes in {n_layers} layers",
                threshold=f"every code in [-{QMAX}, {QMAX}]"),
        outcome("scales", scale_problems,
                figure=f"{n_scales:,} scales" + (f" in [{lo:.3g}, {hi:.3g}]" if n_scales and lo <= hi else ""),
                threshold="finite and >= 0"),
        outcome("finite", finite_problems, figure=f"{n_float:,} floating values", threshold="no NaN or Inf"),
        _check_manifest(folder, report, scans),
        _check_files(folder, report),
        _check_tokenizer(folder, layout, report),
        _check_card(folder, report),
    ]
    layout.bytes_checked = sum(s.bytes for s in scans.values())
    layout.seconds = time.perf_counter() - started
    return checks, layout
