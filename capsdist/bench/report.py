"""Write `make bench` results: `## Latest make bench` in docs/bench.md and `## Performance` in
docs/results.md.

    python -m capsdist.bench.report RESULT.json [RESULT.json ...]

Each RESULT.json holds the last stdout line of one `capsdist bench model` run. Only those two
sections are replaced (created if absent); the rest of both files is kept.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HEADER = (
    "| config | precision | batch | device | threads | images/s | step ms | conv floor ms "
    "| step / conv floor | plain images/s | speedup vs plain | peak mem MB | TFLOP/s | MFU "
    "| MFU peaks (conv / capsules / decoder) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        c, plain = r["config"], r.get("plain", {})
        peaks = r.get("mfu_precisions", {})
        rows.append(
            f"| {' '.join(c['files'] + c['overrides'])} | {c['precision']} | {c['batch_size']} "
            f"| {c['device']} | {c['threads']} | {r['images_per_s']} | {r['step_ms']} "
            f"| {r['conv_floor_ms']} | {r['step_over_conv_bound']} "
            f"| {plain.get('images_per_s', '–')} | {r.get('speedup_vs_plain', '–')} "
            f"| {r['peak_mem_mb']} | {r['achieved_tflops']} | {r['mfu'] or '–'} "
            f"| {' / '.join(peaks[k] for k in ('conv', 'capsules', 'decoder')) if peaks else '–'} |"
        )
    return HEADER + "\n".join(rows) + "\n"


def replace_section(text: str, title: str, body: str) -> str:
    """`text` with the `## title` section (up to the next `## `) replaced by body, or appended."""
    section = f"## {title}\n\n{body}"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda _: section + "\n", text, count=1)
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section


def main(paths: list[str], docs: Path = Path("docs")) -> None:
    results = [json.loads(Path(p).read_text().strip().splitlines()[-1]) for p in paths]
    rows = table(results)
    note = (
        "Measured by `make bench` (`capsdist bench model -c CONFIG [key=value] --compare-plain`);"
        " medians over the timed rounds, step and conv floor timed back to back. On a shared "
        "CPU these figures are noisy: compare runs of the same table only.\n\n"
    )
    docs.mkdir(exist_ok=True)
    bench_md = docs / "bench.md"
    text = bench_md.read_text() if bench_md.exists() else "# Benchmarks (`make bench`)\n"
    bench_md.write_text(replace_section(text, "Latest make bench", note + rows))
    results_md = docs / "results.md"
    text = results_md.read_text() if results_md.exists() else "# Results\n"
    results_md.write_text(replace_section(text, "Performance", note + rows))


if __name__ == "__main__":
    main(sys.argv[1:])
