"""The structure and integrity checks of a bitsandbytes 8-bit checkpoint (`int8 convert --format bnb`, or
transformers' own ``save_pretrained`` of a ``load_in_8bit`` model): the same checks, in the same order and
under the same names, as for compressed-tensors (`int8.verify.structure`).

Each quantized linear ``M`` is paired with its three tensors (`int8.formats.bitsandbytes`) into a
`QuantLayer` whose "packed" tensor is the int8 ``M.weight``, whose scale is ``M.SCB`` and whose block
is the whole row, so the generic checks (index, manifest, files, tokenizer, card) and the reference of
the fidelity phase work on it unchanged. What is particular to the layout is checked here:

* config: ``quantization_config`` as transformers writes it for ``load_in_8bit``; every linear that
  holds an SCB is one transformers converts, every other one is one it skips;
* tensors: ``M.weight`` int8 ``(out, in)``, ``M.SCB`` float32 ``(out,)``, ``M.weight_format`` uint8 scalar,
  every other tensor the model expects there with its shape, nothing else;
* codes: in [-127, 127]; each row's largest ``|q|`` is exactly 127 (SCB is the row's absmax), or the row
  is all zeros with SCB 0;
* scales: every SCB finite and >= 0, a float16 value (bitsandbytes quantizes float16 weights), 0 only
  for an all-zero row; every ``weight_format`` 0 (row-major);
* finite, sha256: the shared data pass (`int8.verify.scan`) over everything else.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..formats import bitsandbytes as bnb_format
from ..formats.safetensors import DTYPES
from ..hf import FROM_TORCH_NAME, NameMap, WeightLayout, weight_layout
from ..paths import plain
from ..scheme import QMAX
from .checks.config import check_index
from .checks.files import check_contained, check_report
from .layout import Layout, QuantLayer, Reading, StoredTensor, model_fields
from .provenance import read_origin
from .read import config_dtype, meta_model, read_index, read_report
from .result import Group, outcome, skipped
from .scan import scan_all
from .structure import STRUCTURE_CHECKS, Structure, _metrics, finish

MAX_LISTED = 8


def is_bnb(folder: Path) -> bool:
    """Whether ``folder``'s config.json says bitsandbytes (its ``quantization_config.quant_method``)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == bnb_format.QUANT_METHOD


def check_structure(folder: Path, *, workers: int | None = None) -> Structure:
    """Every structure and integrity check of a bitsandbytes 8-bit folder."""
    started = time.perf_counter()
    folder = Path(folder)
    contained = check_contained(folder)
    if contained.failed:
        why = "a file of the folder links outside it, so nothing was read"
        checks = (contained, *(skipped(n, why, group=Group.STRUCTURE) for n in STRUCTURE_CHECKS))
        return Structure(checks, Layout(folder), _metrics(0, 0.0, time.perf_counter() - started))
    origin = read_origin(folder)
    report, report_reading = read_report(folder)
    config, config_problems, meta = _read_config(folder, report)
    idx = read_index(folder, single_file=not origin.own)
    quantized, tensor_problems = (_pair(idx.tensors, config, meta) if meta is not None and idx.tensors
                                  else ({}, ["not checked: config.json does not give the model's tensors"] if meta is None else []))
    if meta is not None:
        config_problems += _skip_problems(config, meta, quantized)
    layout = Layout(
        folder=folder,
        report=report,
        config=config,
        **model_fields(meta),
        dtype=FROM_TORCH_NAME.get(str((config or {}).get("dtype") or (config or {}).get("torch_dtype"))),
        scale_dtype="F32",
        tensors=idx.tensors,
        shards=idx.shards,
        quantized=quantized,
        origin=origin,
        bnb=True,
    )
    scan_started = time.perf_counter()
    mine = {n for q in quantized.values() for n in (q.packed.name, q.scale.name, q.shape.name if q.shape else "")}
    others = dataclasses.replace(layout, quantized={}, tensors={n: t for n, t in idx.tensors.items() if n not in mine})
    scans = scan_all(list(layout.shards), others, workers)
    codes, scales, n_codes, n_rows = _check_layers(layout)
    scan_seconds = time.perf_counter() - scan_started
    config_check = outcome(
        "config", config_problems,
        figure=(f"{layout.model_class or '?'}, bitsandbytes load_in_8bit, threshold "
                f"{(config or {}).get('quantization_config', {}).get('llm_int8_threshold')}, dtype "
                f"{(config or {}).get('dtype') or (config or {}).get('torch_dtype')}") if not config_problems
        else f"{len(config_problems)} problem(s)",
        threshold="bitsandbytes load_in_8bit as transformers writes it; SCB on exactly the layers it converts",
    )
    for path in layout.shards:
        if scans[path].error and path.name not in idx.reading.files:
            tensor_problems.append(scans[path].error)
    tensors_check = outcome("tensors", tensor_problems,
                            figure=f"{len(quantized)} quantized layers, {len(layout.kept)} other tensors",
                            threshold="weight int8 (out, in), SCB float32 (out,), weight_format per layer; "
                            "shapes and dtypes as config.json implies")
    finite = [p for s in scans.values() for p in s.finite]
    checks = (
        contained,
        check_report(layout, _report_format(report, report_reading)),
        config_check,
        check_index(layout, idx.reading),
        tensors_check,
        outcome("codes", codes, figure=f"{n_codes:,} codes in {len(quantized)} layers",
                threshold=f"every code in [-{QMAX}, {QMAX}]; each row's largest |code| {QMAX} (or a zero row)"),
        outcome("scales", scales, figure=f"{n_rows:,} row scales (SCB)",
                threshold="finite, >= 0, float16 values, 0 only for a zero row; weight_format 0 (row)"),
        outcome("finite", finite, figure=f"{sum(s.n_float for s in scans.values()):,} floating values",
                threshold="no NaN or Inf"),
    )
    return finish(checks, layout, scans, origin, started, scan_seconds)


def _report_format(report, reading: Reading) -> Reading:
    """The report's own problems, and one more when it records another format than this folder's."""
    if report is None or bnb_format.is_report_format(report.quantization.format):
        return reading
    return dataclasses.replace(reading, problems=(*reading.problems, (
        f"int8_report.json records the format {report.quantization.format!r}, but config.json says bitsandbytes")))


def _read_config(folder: Path, report) -> tuple[dict | None, list[str], object]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, [f"config.json cannot be read ({type(e).__name__}: {e})"], None
    problems = list(bnb_format.check_config(config.get("quantization_config")))
    config_dtype(config, problems)
    return config, problems, meta_model(folder, problems)


def _converted(meta, config: dict) -> dict[str, object]:
    """The layers transformers converts to Linear8bitLt for this config: the model's Linear and Conv1D
    modules that neither the skip list (or, without one, transformers' defaults) nor _keep_in_fp32_modules name."""
    from ..hf import bnb_default_skips

    qc = config.get("quantization_config") or {}
    skip = bnb_format.skip_modules(qc) if isinstance(qc, dict) else None
    fp32 = list(getattr(meta, "_keep_in_fp32_modules", None) or [])
    patterns = bnb_default_skips(meta) if skip is None else [*skip, *fp32]
    return {n: m for n, m in meta.named_modules() if weight_layout(m) is not None and not bnb_format.is_skipped(n, patterns)}


def _skip_problems(config: dict, meta, quantized: dict[str, QuantLayer]) -> list[str]:
    converts = _converted(meta, config)
    problems = []
    for name in sorted(set(quantized) - set(converts)):
        problems.append(f"config.json: quantization_config skips {name} (llm_int8_skip_modules or the model's defaults), "
                        "but the checkpoint stores it quantized: transformers would load its int8 codes as weights")
    for name in sorted(set(converts) - set(quantized))[:MAX_LISTED]:
        problems.append(f"config.json: transformers would convert {name} to Linear8bitLt, but the checkpoint stores it "
                        "unquantized: name it in llm_int8_skip_modules")
    return problems


def _pair(tensors: dict[str, StoredTensor], config: dict, meta) -> tuple[dict[str, QuantLayer], list[str]]:
    """Each quantized layer with its three tensors; every other tensor against what the model expects."""
    names = NameMap.of(meta)
    modules = dict(meta.named_modules())
    params = dict(meta.state_dict(keep_vars=True))
    tied = dict(getattr(meta, "all_tied_weights_keys", None) or {})
    problems: list[str] = []
    quantized: dict[str, QuantLayer] = {}
    used: set[str] = set()
    for name, t in sorted(tensors.items()):
        if not name.endswith(f".{bnb_format.SCB}"):
            continue
        mod = names.model_name(name).removesuffix(f".{bnb_format.SCB}")
        prefix = name.removesuffix(f".{bnb_format.SCB}")
        module = modules.get(mod)
        layout = weight_layout(module) if module is not None else None
        weight, fmt = tensors.get(f"{prefix}.{bnb_format.WEIGHT}"), tensors.get(f"{prefix}.{bnb_format.WEIGHT_FORMAT}")
        used.update({name, f"{prefix}.{bnb_format.WEIGHT}", f"{prefix}.{bnb_format.WEIGHT_FORMAT}"})
        where = f"{t.file.name}: {plain(name)}"
        if layout is None:
            problems.append(f"{where}: {plain(mod)} is no linear layer of {type(meta).__name__}")
            continue
        w = params[f"{mod}.weight"]
        out_f, in_f = (w.shape[1], w.shape[0]) if layout == WeightLayout.CONV1D else (w.shape[0], w.shape[1])
        ok = True
        if weight is None:
            problems.append(f"{where} has no {bnb_format.WEIGHT} beside it")
            ok = False
        elif weight.dtype != "I8" or weight.shape != (out_f, in_f):
            problems.append(f"{weight.file.name}: {plain(weight.name)} is {weight.dtype} {list(weight.shape)}, but "
                            f"{type(meta).__name__} built from config.json needs int8 [{out_f}, {in_f}]")
            ok = False
        if t.dtype != "F32" or t.shape != (out_f,):
            problems.append(f"{where} is {t.dtype} {list(t.shape)}, but needs float32 [{out_f}] (one per output row)")
            ok = False
        if fmt is None:
            problems.append(f"{where}: {plain(prefix)} has no {bnb_format.WEIGHT_FORMAT}")
        elif fmt.dtype != "U8" or fmt.shape != ():
            problems.append(f"{fmt.file.name}: {plain(fmt.name)} is {fmt.dtype} {list(fmt.shape)}, not a uint8 scalar")
            ok = False
        if ok:
            quantized[mod] = QuantLayer(mod, out_f, in_f, layout, weight, t, fmt, block_size=in_f)
    for name, t in sorted(tensors.items()):
        if name in used:
            continue
        model_name = names.model_name(name)
        where = f"{t.file.name}: {plain(name)}"
        if name.endswith(f".{bnb_format.WEIGHT}") and t.dtype == "I8":
            problems.append(f"{where} holds int8 codes but has no {bnb_format.SCB} beside it")
            continue
        if model_name not in params:
            problems.append(f"{where} is not a tensor of {type(meta).__name__}")
            continue
        want = tuple(params[model_name].shape)
        if tuple(t.shape) != want:
            problems.append(f"{where} has shape {list(t.shape)}, but {type(meta).__name__} built from config.json expects {list(want)}")
    provided = {names.model_name(n) for n in tensors} | {f"{m}.weight" for m in quantized}
    missing = []
    for pname in params:
        if pname in provided or pname.rsplit(".", 1)[0] in quantized:
            continue
        if tied.get(pname) in provided or any(tied.get(o) == pname for o in provided):
            continue
        missing.append(pname)
    ignore = [p for p in (getattr(meta, "_keys_to_ignore_on_load_missing", None) or [])]
    import re

    missing = [m for m in missing if not any(re.search(p, m) for p in ignore)]
    if missing:
        problems.append(f"the checkpoint lacks {len(missing)} tensor(s) {type(meta).__name__} needs, e.g. "
                        + ", ".join(plain(m) for m in missing[:4]))
    return quantized, problems


def _read(t: StoredTensor) -> torch.Tensor | None:
    """A stored tensor's data, mapped from its file (None when the file is shorter: the index check says so)."""
    try:
        if t.file.stat().st_size < t.end:
            return None
        arr = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.start, shape=(t.nbytes,)) if t.nbytes else np.zeros(0, np.uint8)
    except (OSError, ValueError):
        return None
    raw = torch.from_numpy(np.array(arr))
    return raw.view(DTYPES[t.dtype]).reshape(t.shape)


def _check_layers(layout: Layout) -> tuple[list[str], list[str], int, int]:
    """The codes and scales of every quantized layer (see the module docstring)."""
    codes_p: list[str] = []
    scales_p: list[str] = []
    n_codes = n_rows = 0
    for q in layout.quantized.values():
        w, scb, fmt = _read(q.packed), _read(q.scale), _read(q.shape) if q.shape is not None else None
        if w is None or scb is None:
            continue
        n_codes += w.numel()
        n_rows += scb.numel()
        wn, sn = f"{q.packed.file.name}: {plain(q.packed.name)}", f"{q.scale.file.name}: {plain(q.scale.name)}"
        minus = w == -128
        if minus.any():
            r, c = (int(i) for i in minus.nonzero()[0])
            codes_p.append(f"{wn} holds {int(minus.sum())} code(s) of -128 (first at row {r}, column {c}); "
                           f"codes must lie in [-{QMAX}, {QMAX}]")
        peak = w.abs().amax(dim=1).to(torch.int16) if w.numel() else torch.zeros(0, dtype=torch.int16)
        nonzero = scb != 0
        bad_peak = (nonzero & (peak != QMAX)) & ~minus.any(dim=1)
        if bad_peak.any():
            r = int(bad_peak.nonzero()[0])
            codes_p.append(f"{wn}: {int(bad_peak.sum())} row(s) whose largest |code| is not {QMAX} (first row {r}: "
                           f"{int(peak[r])}): SCB is the row's absmax, so one code of each row is +-{QMAX}")
        nan = torch.isnan(scb)
        if nan.any():
            scales_p.append(f"{sn} has {int(nan.sum())} NaN scale(s) (first at row {int(nan.nonzero()[0])})")
        inf = torch.isinf(scb)
        if inf.any():
            scales_p.append(f"{sn} has {int(inf.sum())} infinite scale(s) (first at row {int(inf.nonzero()[0])})")
        neg = scb < 0
        if neg.any():
            scales_p.append(f"{sn} has {int(neg.sum())} negative scale(s) (first at row {int(neg.nonzero()[0])})")
        finite = torch.isfinite(scb) & ~neg
        off16 = finite & (scb.to(torch.float16).float() != scb)
        if off16.any():
            r = int(off16.nonzero()[0])
            scales_p.append(f"{sn}: {int(off16.sum())} scale(s) that are not float16 values (first row {r}: "
                            f"{float(scb[r]):.9g}); bitsandbytes takes each row's absmax of the float16 weight")
        zero_rows = (~nonzero) & (peak != 0)
        if zero_rows.any():
            r = int(zero_rows.nonzero()[0])
            scales_p.append(f"{sn}: {int(zero_rows.sum())} row(s) with SCB 0 but codes that are not all 0 (first row {r})")
        if fmt is not None and int(fmt.reshape(-1)[0]) != bnb_format.ROW_FORMAT:
            scales_p.append(f"{q.shape.file.name}: {plain(q.shape.name)} is {int(fmt.reshape(-1)[0])}, not "
                            f"{bnb_format.ROW_FORMAT} (row-major int8, the only format transformers saves)")
    return codes_p, scales_p, n_codes, n_rows

