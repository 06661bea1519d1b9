"""The HTML report opened in headless Chromium: the Pareto chart renders every point, with no JavaScript error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from autoprune.results import plots, report
from autoprune.results.tables import load

from conftest import require_service
from test_plots import plot_run  # noqa: F401  (the session's real small run)

PROBE = """<script>setTimeout(function () {
  var p = document.createElement("pre"); p.id = "probe";
  p.textContent = JSON.stringify({errors: window.__errors,
    points: document.querySelectorAll("#pareto .scatterlayer path.point").length,
    svgs: document.querySelectorAll("#pareto svg.main-svg").length});
  document.body.appendChild(p);
}, 3000);</script></body>"""
CATCH = '<head><script>window.__errors = []; addEventListener("error", function (e) { __errors.push(String(e.message)); });</script>'


def test_report_renders_in_headless_chromium(plot_run, tmp_path):  # noqa: F811
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require_service("chromium", exe is not None, "install the Debian package `chromium`")
    res = load(plot_run)
    page = report.html_report(res, tmp_path / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", CATCH, 1).replace("</body>", PROBE, 1))
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
                          str(probe)], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">([^<]*)</pre>', out.stdout)
    assert m, out.stderr[-2000:]
    got = json.loads(m.group(1).replace("&quot;", '"'))
    fig = plots.pareto_figure(res, "macs")
    expected = sum(len(t.x) for t in fig.data if "markers" in (t.mode or ""))
    assert got["errors"] == []
    assert got["svgs"] >= 1 and got["points"] == expected > 10
