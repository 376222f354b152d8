"""The small files of a converted checkpoint, read for `int8.verify.layout.read_layout`.

Each reader returns what it read and a `Reading` with the problems it met, in
the words the structure checks report them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..blocks import block_candidates
from ..errors import CorruptCheckpoint, UnsafePath, first_line
from ..formats.compressed_tensors import ConfigGroup, check_config
from ..formats.safetensors import SAFE_INDEX, SAFE_SINGLE, scan_safetensors_header
from ..formats.safetensors import read_index as read_weight_map
from ..hf import FROM_TORCH_NAME
from ..paths import inside, plain, show
from ..report import REPORT_NAME, ConversionReport
from ..report import SCHEMA as REPORT_SCHEMA
from .layout import Reading, ReadState, StoredTensor


def read_report(folder: Path) -> tuple[ConversionReport | None, Reading]:
    """int8_report.json (the manifest among it)."""
    path = folder / REPORT_NAME
    if not path.is_file():
        return None, Reading((f"{REPORT_NAME} is missing: there is no manifest to check the files against",), ReadState.MISSING)
    try:
        data = json.loads(path.read_text())
        report = ConversionReport.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        problem = f"{REPORT_NAME} is not a valid conversion report ({type(e).__name__}: {e})"
        return None, Reading((problem,), ReadState.UNREADABLE)
    problems = []
    if data.get("schema") != REPORT_SCHEMA:
        problems.append(f"{REPORT_NAME} has schema {data.get('schema')!r}, not {REPORT_SCHEMA!r}")
    if not report.files:
        problems.append(f"{REPORT_NAME} lists no files")
    return report, Reading(tuple(problems))


@dataclass(frozen=True)
class ConfigRead:
    """config.json, what its quantization_config says, and the model transformers builds from it."""

    reading: Reading
    config: dict[str, Any] | None = None
    groups: tuple[ConfigGroup, ...] = ()  # quantization_config's well-formed config groups
    dtype: str | None = None  # config.json's dtype (of everything not quantized) as a safetensors name (F16...)
    scale_dtype: str | None = None  # the scales' dtype int8_report.json records (None: no report says)
    ignore: tuple[str, ...] = ()  # quantization_config.ignore's well-formed entries
    report_blocks: dict[str, int] = field(default_factory=dict)  # module -> block size int8_report.json records
    meta: Any = field(default=None, compare=False)  # the model on the meta device (None: it cannot be built)


def read_config(folder: Path, report: ConversionReport | None) -> ConfigRead:
    path = folder / "config.json"
    if not path.is_file():
        return ConfigRead(Reading(("config.json is missing",), ReadState.MISSING))
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return ConfigRead(Reading((f"config.json is not valid JSON ({e})",), ReadState.UNREADABLE))
    problems: list[str] = []
    qc = config.get("quantization_config")
    ignore: tuple[str, ...] = ()
    groups: tuple[ConfigGroup, ...] = ()
    if not isinstance(qc, dict):
        problems.append("config.json has no quantization_config: this is not a quantized checkpoint")
    else:
        qcheck = check_config(qc)
        problems += qcheck.problems
        groups, ignore = qcheck.groups, qcheck.ignore  # the well-formed ones (the config check reports the rest)
    if report is not None:
        allowed = block_candidates(report.quantization.block_size)
        for g in groups:
            if g.group_size not in allowed:
                problems.append(
                    f"config.json: quantization_config group {show(g.name)} has group_size {g.group_size}, not one of "
                    f"the block sizes of block size {report.quantization.block_size} in {REPORT_NAME} "
                    f"({', '.join(map(str, allowed))})"
                )
    model_dtype = config_dtype(config, problems)
    scale_dtype = FROM_TORCH_NAME.get(report.quantization.scale_dtype) if report is not None else None
    if report is not None and scale_dtype is None:
        problems.append(f"{REPORT_NAME}: scale_dtype {report.quantization.scale_dtype!r} is not float32, float16 or bfloat16")
    meta = meta_model(folder, problems)
    report_blocks = (
        {t.name.rpartition(".")[0]: t.block_size for t in report.quantized if t.block_size} if report is not None else {}
    )
    return ConfigRead(Reading(tuple(problems)), config, groups, model_dtype, scale_dtype, ignore, report_blocks, meta)


def config_dtype(config: dict, problems: list[str]) -> str | None:
    """The safetensors name of config.json's ``dtype`` (or ``torch_dtype``); a problem when it is not a float dtype."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    name = FROM_TORCH_NAME.get(str(dtype))
    if dtype is not None and name is None:
        problems.append(f"config.json: dtype {dtype!r} is not float32, float16 or bfloat16")
    return name


def meta_model(folder: Path, problems: list[str]):
    """The model config.json describes, built on the meta device without its quantization_config; None, and a
    problem, when transformers cannot build it (its own errors: the config is what is wrong)."""
    from ..hf import build_meta_model, load_config

    try:
        config = load_config(folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return build_meta_model(config)
    except Exception as e:
        problems.append(f"transformers cannot build a model from config.json: {first_line(e)}")
        return None


@dataclass(frozen=True)
class IndexRead:
    """The shard index and the headers of the shards it lists."""

    reading: Reading
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    shards: tuple[Path, ...] = ()


def read_index(folder: Path, *, single_file: bool = False) -> IndexRead:
    """The shard index and the headers of the shards it lists; with ``single_file``, a lone
    model.safetensors without an index stands for one (another tool's checkpoint)."""
    index_path = folder / SAFE_INDEX
    if not index_path.is_file() and not index_path.is_symlink():
        loose = sorted(p.name for p in folder.glob("*.safetensors"))
        if single_file and loose == [SAFE_SINGLE]:
            return _single_file(folder)
        problem = f"{SAFE_INDEX} is missing" + (f" (shards present: {', '.join(loose[:4])})" if loose else "")
        return IndexRead(Reading((problem,), ReadState.MISSING))
    try:
        inside(folder, SAFE_INDEX, what="index")
        weight_map = read_weight_map(index_path)
        index = json.loads(index_path.read_bytes())
    except CorruptCheckpoint as e:
        return IndexRead(Reading((e.message,), ReadState.UNREADABLE))
    problems: list[str] = []
    flagged: set[str] = set()  # the shards a problem is about

    def problem(text: str, *files: str) -> None:
        problems.append(text)
        flagged.update(files)

    listed = sorted(set(weight_map.values()))
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    for name in sorted(on_disk - set(listed)):
        problem(f"{name} is a shard on disk that {SAFE_INDEX} does not list", name)
    located: dict[str, StoredTensor] = {}
    unsafe: set[str] = set()
    shards: list[Path] = []
    for fname in listed:
        try:
            path = inside(folder, fname, what=f"shard listed in {SAFE_INDEX}")
        except UnsafePath as e:
            problem(e.message, fname)
            unsafe.add(fname)
            continue
        if not path.is_file():
            n = sum(v == fname for v in weight_map.values())
            problem(f"{SAFE_INDEX} lists shard {plain(fname)}, which is missing ({n} tensors)", fname)
            continue
        shards.append(path)
        tensors, start, found = scan_safetensors_header(path)
        for text in found:
            problem(text, path.name)
        if not start:
            continue
        for t in tensors:
            stored = StoredTensor(t.name, t.dtype, t.shape, path, t.offset, t.nbytes)
            if t.name in located:
                first = located[t.name].file.name
                problem(f"tensor {show(t.name)} is stored twice: in {first} and in {plain(fname)}", first, fname)
            located[t.name] = stored
            where = weight_map.get(t.name)
            if where is None:
                problem(f"{plain(fname)} holds tensor {show(t.name)}, which {SAFE_INDEX} does not list", fname)
            elif where != fname:
                problem(f"{plain(fname)} holds tensor {show(t.name)}, which {SAFE_INDEX} places in {plain(where)}", fname, where)
    for tname, fname in weight_map.items():
        t = located.get(tname)
        if fname not in unsafe and (folder / fname).is_file() and (t is None or t.file != folder / fname):
            if t is None:
                problem(f"{SAFE_INDEX} says tensor {show(tname)} is in {plain(fname)}, but it is not there (nor in any shard)", fname)
            else:
                problem(f"{SAFE_INDEX} says tensor {show(tname)} is in {plain(fname)}, but it is in {t.file.name}", fname, t.file.name)
    total = (index.get("metadata") or {}).get("total_size")
    data_bytes = sum(t.nbytes for t in located.values())
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total != data_bytes):
        shown = total if isinstance(total, int) else "not an integer"
        problems.append(f"{SAFE_INDEX}: metadata.total_size is {shown}, but the shards hold {data_bytes} bytes of tensors")
    return IndexRead(Reading(tuple(problems), files=frozenset(flagged)), located, tuple(shards))


def _single_file(folder: Path) -> IndexRead:
    """A checkpoint stored as one model.safetensors and no index: its header is the index."""
    try:
        path = inside(folder, SAFE_SINGLE, what="weights file")
    except UnsafePath as e:
        return IndexRead(Reading((e.message,), ReadState.UNREADABLE, frozenset({SAFE_SINGLE})))
    tensors, start, found = scan_safetensors_header(path)
    located = {t.name: StoredTensor(t.name, t.dtype, t.shape, path, t.offset, t.nbytes) for t in tensors} if start else {}
    return IndexRead(Reading(tuple(found), files=frozenset({SAFE_SINGLE}) if found else frozenset()), located, (path,))
