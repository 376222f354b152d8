"""The checks about the folder's files: ``contained``, ``report``, ``sha256`` and ``files``."""

from __future__ import annotations

from pathlib import Path

from ...errors import UnsafePath
from ...files import OWN_FILES, sha256_file
from ...paths import inside, links_outside, plain, show
from ...report import REPORT_NAME
from ...report import SCHEMA as REPORT_SCHEMA
from ..layout import Layout, Reading, ReadState
from ..result import Check, outcome
from ..scan import ShardScan

NOT_IN_MANIFEST = set(OWN_FILES)
"""Files that legitimately change after conversion, so the manifest leaves them out."""
LOAD_AFFECTING = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".py", ".gguf")
"""Files outside the manifest with these endings fail the integrity check (they change what loads)."""


def check_contained(folder: Path) -> Check:
    """No symlink in the folder leads outside it (`int8.paths`): the one check run before any file is read."""
    outside = links_outside(folder)
    problems = [f"{plain(n)} is a link to a place outside the folder" for n in outside]
    return outcome("contained", problems, figure=f"{len(outside)} links outside",
                   threshold="every file inside the folder after resolving links")


def check_report(layout: Layout, reading: Reading) -> Check:
    threshold = f"present, schema {REPORT_SCHEMA}"
    report = layout.report
    if reading.state is not ReadState.READ or report is None:
        return outcome("report", list(reading.problems), figure=reading.state.value, threshold=threshold)
    figure = f"int8 {report.int8_version}, {len(report.files)} files, {len(report.quantized)} quantized tensors"
    return outcome("report", list(reading.problems), figure=figure, threshold=threshold)


def check_manifest(layout: Layout, scans: dict[Path, ShardScan]) -> Check:
    """Every file of the manifest is there with its size and SHA-256; nothing that changes what loads is added."""
    threshold = "every file as in the manifest; no unlisted weight or config file"
    folder, report = layout.folder, layout.report
    if report is None:
        return outcome("sha256", [f"no manifest: {REPORT_NAME} is missing or unreadable"], figure="no manifest",
                       threshold=threshold)
    problems = []
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
        scan = scans.get(path)
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


def check_files(layout: Layout) -> Check:
    """Every file push would upload is in the manifest (or is the card, the report or the verify record)."""
    threshold = "every file push would upload is in the manifest (README.md, int8_report.json, int8_verify.json apart)"
    from ...hub.upload import pushed_files

    pushed = pushed_files(layout.folder)
    if layout.report is None:
        return outcome("files", [f"no manifest: {REPORT_NAME} is missing or unreadable"], figure="no manifest",
                       threshold=threshold)
    listed = {e.name for e in layout.report.files}
    extra = [n for n in pushed if n not in listed and n not in NOT_IN_MANIFEST]
    problems = [
        f"{n} is not in the manifest: verify cannot vouch for it, and push would publish it (remove it, or convert again)"
        for n in extra
    ]
    return outcome("files", problems, figure=f"{len(pushed)} files, {len(extra)} outside the manifest", threshold=threshold)
