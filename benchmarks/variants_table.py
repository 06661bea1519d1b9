"""Ten-seed variants of the default search against the committed ten-seed default and LAMP: test % after the common
recovery (mean ± std over seeds), and each difference in test pp with its 95 % interval over test images, paired
by image and seed (`peers.paired_delta`). A benchmark table, not a test.

    python benchmarks/variants_table.py "centre=r20:benchmarks/results/peers-10seeds-r20-centre-2026-11-27.csv,..."

Each argument is LABEL=MODEL:CSV[,MODEL:CSV...], MODEL one of r20, rx, mb, m1d (the rows below); a row with fewer
than ten seeds of a variant shows its mean only. `--rows "LABEL|CSV|SETTING|MODEL;..."` replaces the committed rows
(the default and LAMP then come from each row's CSV): the held-out rows of the balanced-widths experiment were
tabled this way."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import paired_delta  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = [  # (row, the committed ten-seed csv, its setting, the model key of a variant argument)
    ("ResNet-20, 50 %", "peers-10seeds-r20-2026-11-27.csv", "macs50", "r20"),
    ("ResNet-20, 30 %", "peers-10seeds-r20-2026-11-27.csv", "macs30", "r20"),
    ("ResNet-20, 15 %", "peers-10seeds-r20-15-2026-11-27.csv", "macs15", "r20"),
    ("ResNeXt-20, 50 %", "peers-10seeds-resnext20-2026-11-27.csv", "macs50", "rx"),
    ("ResNeXt-20, 30 %", "peers-10seeds-resnext20-2026-11-27.csv", "macs30", "rx"),
    ("MobileNetV2, 50 %", "peers-10seeds-mobilenetv2-2026-11-27.csv", "macs50", "mb"),
    ("MobileNetV2, 30 %", "peers-10seeds-mobilenetv2-2026-11-27.csv", "macs30", "mb"),
    ("ResNet-1D, MNIST-1D, 15 %", "peers-10seeds-mnist1d-15-2026-11-27.csv", "macs15", "m1d"),
]


def _read(path: Path | str) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"test_correct": str})  # one 0/1 character per test image


def _mean(d: pd.DataFrame) -> str:
    v = d.test_ft * 100
    return f"{v.mean():.2f} ± {v.std():.2f}"


def _delta(x: tuple[float, float, float] | None) -> str:
    return "–" if x is None else f"{x[0]:+.2f} [{x[1]:+.2f}, {x[2]:+.2f}]"


def main(argv: list[str]) -> None:
    rows = ROWS
    if "--rows" in argv:  # other rows than the committed ones: --rows "LABEL|CSV|SETTING|MODEL;..." (default and
        i = argv.index("--rows")  # LAMP are read from each row's CSV, e.g. a run of held-out models)
        rows = [tuple(r.split("|")) for r in argv[i + 1].split(";")]
        argv = argv[:i] + argv[i + 2:]
    variants = dict(a.split("=", 1) for a in argv)  # LABEL -> MODEL:CSV[,MODEL:CSV...]
    print("| model, MACs | default | LAMP | " + " | ".join(f"{k} | {k} − default | {k} − LAMP" for k in variants) + " |")
    print("|" + "---|" * (3 + 3 * len(variants)))
    for label, csv, setting, key in rows:
        base = _read(RESULTS / csv)  # (an absolute path stays itself)
        base = base[base.setting == setting]
        default, lamp = base[base.method == "autoprune"], base[base.method == "lamp"]
        cells = [label, f"{_mean(default)} ({default.search_wall_s.mean():.1f} s)", _mean(lamp)]
        for paths in variants.values():
            files = [p.split(":", 1)[1] for p in paths.split(",") if p.split(":", 1)[0] == key]
            v = pd.concat([_read(p) for p in files]) if files else None
            v = None if v is None else v[(v.setting == setting) & (v.method == "autoprune")]
            if v is None or len(v) < 10:
                cells += ["–" if v is None or v.empty else f"({len(v)} seeds) {_mean(v)}", "–", "–"]
                continue
            cells += [f"{_mean(v)} ({v.search_wall_s.mean():.1f} s)", _delta(paired_delta(v, default)),
                      _delta(paired_delta(v, lamp))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
