"""Read and validate the labelled text the ``data`` step (and training) feed both workers.

The layout is SST-2's: a header line naming a ``sentence`` and a ``label`` column
(other columns are allowed and ignored), then one example per line, fields separated
by tabs. No quoting: a ``"`` is an ordinary character (pandas' default quoting would
silently merge lines that contain an odd number of quotes). Entirely blank lines are
skipped, as pandas does. Everything else that is off is refused with the file, the
line number and the reason, before any worker is asked to tokenize anything.

The coordinator reads the file itself (no framework needed) and sends the sentences
and labels to both workers, so both tokenize byte-identical strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

DEMO_DIR = Path(__file__).resolve().parent / "data"
DEMO_FILES = {"train": DEMO_DIR / "demo_train.tsv", "dev": DEMO_DIR / "demo_dev.tsv"}


@dataclass
class Split:
    """One TSV file's examples; ``lines[i]`` is the 1-based file line of example ``i``."""

    name: str
    path: Path
    sentences: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sentences)

    def where(self, i: int) -> str:
        """``file:line`` of example ``i`` (for error messages)."""
        return f"{self.path.name}:{self.lines[i]}"

    def label_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for lab in self.labels:
            out[lab] = out.get(lab, 0) + 1
        return dict(sorted(out.items()))


NUM_LABELS = 2   # the BERT presets' classifier (steps/common.model_body loads two labels)


def read_tsv(path: str | Path, name: str = "data") -> Split:
    """Parse and validate one SST-2-style TSV; raise ``UsageError`` naming file, line and reason."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        raise UsageError(f"{path}: {what} (expected a TSV with a header 'sentence<TAB>label')")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a BOM from spreadsheet exports
    lines = text.split("\n")   # not splitlines(): U+2028, NEL or a form feed inside a sentence is text
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines or not lines[0].strip():
        raise UsageError(f"{path}:1: empty file or empty header (expected 'sentence<TAB>label')")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in ("sentence", "label") if c not in header]
    if missing:
        cr = " (its lines end in a bare CR, old Mac style: convert them to LF)" if "\r" in lines[0] else ""
        raise UsageError(f"{path}:1: header has no {' and no '.join(repr(c) for c in missing)} column "
                         f"(found {header}; expected tab-separated 'sentence' and 'label'){cr}")
    twice = [c for c in ("sentence", "label") if header.count(c) > 1]
    if twice:
        raise UsageError(f"{path}:1: header names {', '.join(repr(c) for c in twice)} more than once ({header})")
    s_col, l_col = header.index("sentence"), header.index("label")
    split = Split(name, path)
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        if len(fields) != len(header):
            raise UsageError(f"{path}:{n}: {len(fields)} tab-separated field(s), the header has {len(header)} "
                             f"({', '.join(header)}): {raw[:80]!r}")
        sentence, label_text = fields[s_col], fields[l_col].strip()
        if not sentence.strip():
            raise UsageError(f"{path}:{n}: empty sentence")
        if not re.fullmatch(r"-?[0-9]+", label_text):   # int() would also take '+1', '0_0' or other scripts' digits
            raise UsageError(f"{path}:{n}: label {label_text!r} is not an integer")
        label = int(label_text)
        if label < 0:
            raise UsageError(f"{path}:{n}: label {label} is negative (class indices start at 0)")
        if label >= NUM_LABELS:
            raise UsageError(f"{path}:{n}: label {label} is not a class of the {NUM_LABELS}-label classifier the "
                             f"BERT presets build (labels 0..{NUM_LABELS - 1})")
        split.sentences.append(sentence)
        split.labels.append(label)
        split.lines.append(n)
    if not split.sentences:
        raise UsageError(f"{path}: no examples after the header")
    return split


def load_splits(data: str | Path | None) -> list[Split]:
    """The shipped demo set (``train`` and ``dev``), or the user's one TSV as a single split ``data``.

    A user file is compared whole as one split rather than cut into train/dev: the data
    step checks tokenization and batching, and every line should be checked.
    """
    if data is None:
        return [read_tsv(p, name) for name, p in DEMO_FILES.items()]
    return [read_tsv(data, "data")]


def require_batches(split: Split, batch_size: int, batches: int = 1) -> None:
    """Refuse a split too small for the batches a step needs, saying how many rows it has."""
    need = batch_size * batches
    if len(split) < need:
        raise UsageError(f"{split.path}: {len(split)} example(s), too few for {batches} batch(es) of "
                         f"{batch_size} (need at least {need}; lower --batch-size or add rows)")
