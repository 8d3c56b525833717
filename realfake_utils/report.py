"""REPORT.md of a run folder, its record, and the README's generated results section (notebook 09).

- :func:`build` loads the step records (:class:`tables.RunRecords`) and the published numbers, and returns
  a :class:`ReportRecord`: the tables (:mod:`realfake_utils.tables`), the claims with computed verdicts
  (:mod:`realfake_utils.claims`), the machine and the notebooks' wall times.
- :func:`report_markdown` / :func:`write_report` -> ``REPORT.md`` (atomically).
- :func:`readme_results` / :func:`update_readme` write the README's results section between
  ``<!-- results:start -->`` and ``<!-- results:end -->`` and ``docs/results-<preset>.md`` from runs'
  ReportRecords; measured numbers are never hand-typed. Command::

      python -m realfake_utils.report readme runs/digits runs/eurosat-mini

A miniature preset's verdicts say whether the paper's direction shows up "in miniature"; a paper preset's
report says "verdict" (same computation, at the paper's protocol).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from . import claims as C
from . import paper as P
from . import tables as T
from .records import Record
from .records import _root as run_root
from .rundir import atomic_path

RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
STEP = "09_figures_tables"


@dataclass
class ReportRecord(Record):
    """What 09 measured and judged; the README's results section is generated from it."""

    STEP: ClassVar[str] = STEP

    preset: str
    paper_preset: bool
    paper_column: str
    paper_column_label: str
    steps: dict[str, bool]
    tables: dict[str, T.Table]
    claims: list[C.Claim]
    protocol: dict[str, Any] = field(default_factory=dict)  # tables.protocol: data set, splits, models, settings
    figures: list[str] = field(default_factory=list)      # relative to the run folder
    machine: dict[str, Any] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verdict_label(self) -> str:
        return "verdict" if self.paper_preset else "verdict in miniature"


def machine_description() -> dict[str, Any]:
    """The machine 09 runs on: CPU, core count, OS, Python / torch versions, GPU name if any."""
    import torch

    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return out


def parse_run_log(root: str | Path) -> dict[str, float]:
    """Seconds per notebook from the runner's ``run.log`` (``<date> <time> NN_name ok 12.3s``; last wins)."""
    path = Path(root) / "run.log"
    out: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r"\S+ \S+ (\d\d_\w+) ok ([0-9.]+)s", line)
            if m:
                out[m.group(1)] = float(m.group(2))
    return out


def build(run: Any, preset: str, paper_numbers: str | Path | None = None, figures: Sequence[str] = (),
          recs: T.RunRecords | None = None) -> ReportRecord:
    """The :class:`ReportRecord` of a run folder (``run``: a ``RunDir`` or a path; ``recs``: its records
    when already loaded)."""
    root = run_root(run)
    recs = recs if recs is not None else T.RunRecords.load(root)
    paper = P.PaperNumbers.load(paper_numbers)
    column, label = P.paper_column(preset)
    return ReportRecord(
        preset=preset, paper_preset=P.is_paper_preset(preset), paper_column=column, paper_column_label=label,
        steps=recs.steps(), tables=T.all_tables(recs, paper, preset), claims=C.all_claims(recs, paper, column),
        protocol=T.protocol(recs),
        figures=list(figures), machine=machine_description(), wall_seconds=parse_run_log(root))


def _machine_line(rec: ReportRecord) -> str:
    m = rec.machine
    return (f"{m.get('processor', '?')}, {m.get('cpu_count', '?')} cores, GPU {m.get('cuda', 'none')}; "
            f"{m.get('platform', '')}; Python {m.get('python', '')}, torch {m.get('torch', '')}")


def report_markdown(rec: ReportRecord, citations: dict[str, str] | None = None) -> str:
    """REPORT.md: claims (summary, then each with its comparisons), tables, figures, machine and time."""
    v = rec.verdict_label
    out = [f"# Real-Fake {'reproduction' if rec.paper_preset else 'in miniature'}: report of preset `{rec.preset}`", ""]
    if rec.preset == "smoke":
        out += ["**Preset `smoke`: CI size. The numbers exercise the pipeline and mean nothing.**", ""]
    out += ["Generated by `09_figures_tables` from the run folder's records. Comparisons are over seeds: paired "
            "(same classifier seeds on both sides) where both sides share them, Welch otherwise; 95 % intervals "
            "(`realfake_utils.stats`). *holds*: the interval lies on the paper's side; *contradicted*: on the other; "
            "*inconclusive*: it straddles zero.",
            f"Paper numbers shown beside this run: {rec.paper_column_label}.", "",
            "## Claims", "", C.summary_markdown(rec.claims, v)]
    out += [C.claim_markdown(c, v) for c in rec.claims]
    out += ["## Tables", ""] + [T.markdown(t) for t in rec.tables.values()]
    out += ["## Protocol (from the steps' records)", "", T.protocol_markdown(rec.protocol)]
    if rec.figures:
        out += ["## Figures", ""] + [f"- [{Path(f).stem}]({f})" for f in rec.figures] + [""]
    out += ["## Machine and time", "", f"- machine: {_machine_line(rec)}"]
    if rec.wall_seconds:
        total = sum(rec.wall_seconds.values())
        out.append("- wall time per notebook (run.log): " + ", ".join(
            f"{k} {s:.0f} s" for k, s in rec.wall_seconds.items()) + f"; total {total / 60:.1f} min")
    if citations:
        out += ["", "## References", ""] + [f"- {k}: {t}" for k, t in citations.items()]
    return "\n".join(out).rstrip() + "\n"


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_report(run: Any, rec: ReportRecord, paper_numbers: str | Path | None = None) -> Path:
    """``REPORT.md`` in the run folder, and the record (``results/09_figures_tables.json``)."""
    root = run_root(run)
    rec.save(root)
    return write_text(root / "REPORT.md", report_markdown(rec, P.PaperNumbers.load(paper_numbers).citations))


# --------------------------------------------------------------------------------------------- README
def _table1_cell(rec: ReportRecord) -> str:
    t = rec.tables.get("table1")
    if t is None or not t.rows:
        return "not measured"
    return " / ".join(str(r[3]).split(" (n=")[0] for r in t.rows)


def _checks_cell(rec: ReportRecord) -> str:
    t = rec.tables.get("checks")
    if t is None or not t.rows:
        return "not measured"
    met = sum("**no**" not in str(r[3]) for r in t.rows)
    part = sum("**no**" in str(r[3]) and "yes" in str(r[3]) for r in t.rows)
    oracle = [r for r in t.rows if str(r[0]).startswith("capacity oracle")]
    return (f"{met} of {len(t.rows)} met" + (f" ({part} in part)" if part else "")
            + (f"; oracle {oracle[0][1].split('; sample')[0]})" if oracle else ""))


def readme_results(runs: Sequence[str | Path]) -> str:
    """The README's results section for the given run folders (each needs 09's record): one line per run
    (preset, machine, time, link to ``docs/results-<preset>.md`` with the whole report) and one table of
    every claim's verdict per run, with Table 1's top-1 (synthetic only / real only / real + synthetic)."""
    recs = [ReportRecord.load(r) for r in runs]
    out = [RESULTS_START,
           "_Generated by `python -m realfake_utils.report readme " + " ".join(str(r) for r in runs)
           + "` from the runs' `results/09_figures_tables.json`; do not edit by hand._", ""]
    for rec in recs:
        total = sum(rec.wall_seconds.values())
        out.append(f"- [`{rec.preset}`](docs/results-{rec.preset}.md)" + (f", {total / 60:.0f} min" if total else "")
                   + f" on {_machine_line(rec)}; paper numbers beside it: {rec.paper_column_label}.")
    out += ["", "| | " + " | ".join(f"`{r.preset}` ({r.verdict_label})" for r in recs) + " |",
            "|---|" + "---|" * len(recs),
            "| Table 1 top-1 %: synthetic / real / real + synthetic | " + " | ".join(_table1_cell(r) for r in recs) + " |",
            "| Generator checks (oracle gap, sample probe, MMD² ratio; REPORT.md) | "
            + " | ".join(_checks_cell(r) for r in recs) + " |"]
    for i, c in enumerate(recs[0].claims if recs else []):
        out.append(f"| {c.id}. {c.title} | " + " | ".join(
            f"**{r.claims[i].verdict}**" if i < len(r.claims) else "-" for r in recs) + " |")
    out += ["", RESULTS_END]
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str, start: str = RESULTS_START, end: str = RESULTS_END) -> str:
    """``text`` with everything from ``start`` to ``end`` (inclusive) replaced by ``section``; the
    markers must be there once each."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one '{start}' ... '{end}' pair of markers in the README")
    return text[:i] + section.rstrip("\n") + text[j + len(end):]


def update_readme(runs: Sequence[str | Path], readme: str | Path = "README.md", docs: str | Path = "docs") -> list[Path]:
    """Rewrite the README's results section and ``docs/results-<preset>.md`` (each run's tables and
    claims) from the runs' ReportRecords. Returns the files written."""
    readme = Path(readme)
    written = [write_text(readme, replace_section(readme.read_text(), readme_results(runs)))]
    for r in runs:
        rec = ReportRecord.load(r)
        body = report_markdown(rec)
        body = body.replace("](figures/", f"]({Path(os.path.relpath(Path(r), Path(docs)))}/figures/")
        written.append(write_text(Path(docs) / f"results-{rec.preset}.md",
                                  "<!-- generated by python -m realfake_utils.report readme; do not edit -->\n" + body))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m realfake_utils.report",
                                 description="Regenerate the README's results section from run folders.")
    sub = ap.add_subparsers(dest="command", required=True)
    rd = sub.add_parser("readme", help="write README.md's results section and docs/results-<preset>.md")
    rd.add_argument("runs", nargs="+", help="run folders with 09_figures_tables' record (e.g. runs/digits)")
    rd.add_argument("--readme", default="README.md")
    rd.add_argument("--docs", default="docs")
    args = ap.parse_args(argv)
    for p in update_readme(args.runs, args.readme, args.docs):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
