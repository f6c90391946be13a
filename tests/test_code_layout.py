"""The structure the README promises, held: import direction, no cycles, function sizes, the map of the tree.

The first four tests hold the real tree; the rest plant each fault in a tiny tree and show that the check that
should catch it does (and that the tiny tree without the fault passes every check).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.code_layout import (function_lengths, import_cycles, import_graph, map_findings, modules, size_findings,
                               wrong_way_imports)

ROOT = Path(__file__).resolve().parent.parent


def test_imports_point_inward_and_qvlm_imports_neither_ray_nor_boto():
    assert any(import_graph(ROOT).values())  # the reader sees the tree's imports at all
    assert wrong_way_imports(ROOT) == []


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


def test_functions_stay_within_the_size_budget():
    assert function_lengths(ROOT)
    assert size_findings(ROOT, longest=60, p90_below=30) == []


def test_readme_map_names_every_module_once():
    assert "qvlm.method" in modules(ROOT)
    assert map_findings(ROOT) == []


# --- each check fails on a planted fault -------------------------------------------------------------------

TINY = {
    "jobs/__init__.py": '"""jobs"""\n',
    "jobs/cli.py": "from cluster.driver import run\n",
    "cluster/__init__.py": "",
    "cluster/driver.py": "import ray\nfrom workers.task import search\n\n\ndef run():\n    from workers import task\n",
    "cluster/report/__init__.py": "from cluster.report.page import render\n",
    "cluster/report/page.py": "from qvlm.quant import quantize\n\n\ndef render():\n    return quantize\n",
    "workers/__init__.py": "",
    "workers/task.py": "import boto3\n\nfrom qvlm import quant\n\nfrom . import locations\n",
    "workers/locations.py": "",
    "qvlm/__init__.py": "",
    "qvlm/quant.py": "import torch\n\n\ndef quantize(w):\n    return w\n",
    "qvlm/search.py": "from .quant import quantize\n",
}

MAP = """jobs/        the job file
  cli.py         the command line
cluster/     the driver
  driver.py      phases
  report/        the report
    page.py        report.html
workers/     Ray-side code
  task.py        one task
  locations.py   where things are
qvlm/        the method
  quant.py       quantizers
  search.py      the search
tests/       not a package: its files are not checked
  code_layout.py the checks
"""


def _tree(root: Path, plant: dict[str, str] | None = None, map_text: str = MAP) -> Path:
    """The tiny tree at ``root``, with ``plant``'s text appended to its files (new files created)."""
    for name, text in {**TINY, **{k: TINY.get(k, "") + v for k, v in (plant or {}).items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "README.md").write_text(f"# tiny\n\n## Map of the tree\n\n```\n{map_text}```\n\n## Next\n")
    return root


def _function(name: str, lines: int) -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
    return f"\n\ndef {name}():\n{body}    return 0\n"


def test_the_tiny_tree_passes_every_check_and_its_imports_are_read(tmp_path):
    root = _tree(tmp_path)
    graph = import_graph(root)
    assert graph["qvlm.search"] == {"qvlm.quant"}  # a relative import, resolved
    assert graph["workers.task"] == {"qvlm.quant", "workers.locations"}
    assert graph["cluster.driver"] == {"workers.task"}  # a lazy import too
    assert wrong_way_imports(root) == [] and import_cycles(root) == []
    assert size_findings(root) == [] and map_findings(root) == []


@pytest.mark.parametrize("file,planted,finding", [
    ("qvlm/quant.py", "\n\ndef lazy():\n    from cluster.driver import run\n",
     "qvlm/quant.py:9: qvlm imports cluster.driver.run"),
    ("qvlm/search.py", "import cluster\n", "qvlm/search.py:2: qvlm imports cluster"),
    ("qvlm/search.py", "\n\ndef lazy():\n    import ray\n", "qvlm/search.py:5: qvlm imports ray"),
    ("qvlm/search.py", "from botocore.exceptions import ClientError\n", "qvlm/search.py:2: qvlm imports botocore"),
    ("qvlm/search.py", "import boto3.session\n", "qvlm/search.py:2: qvlm imports boto3"),
    ("workers/task.py", "from jobs import cli\n", "workers/task.py:6: workers imports jobs.cli"),
    ("cluster/report/page.py", "from jobs.cli import run\n", "cluster/report/page.py:6: cluster imports jobs.cli.run"),
], ids=["qvlm-cluster-lazy", "qvlm-cluster", "qvlm-ray-lazy", "qvlm-botocore", "qvlm-boto3", "workers-jobs",
        "subpackage-jobs"])
def test_wrong_way_imports_are_reported(tmp_path, file, planted, finding):
    findings = wrong_way_imports(_tree(tmp_path, {file: planted}))
    assert len(findings) == 1 and findings[0].startswith(finding)


@pytest.mark.parametrize("plant,cycle", [
    ({"qvlm/quant.py": "\n\ndef lazy():\n    from qvlm.search import quantize\n"}, ["qvlm.quant", "qvlm.search"]),
    ({"workers/locations.py": "from .task import search\n"}, ["workers.locations", "workers.task"]),
    ({"cluster/report/page.py": "import cluster.report.model\n", "cluster/report/model.py": "import cluster.report\n"},
     ["cluster.report", "cluster.report.model", "cluster.report.page"]),
], ids=["lazy", "relative", "through-a-package"])
def test_import_cycles_are_reported(tmp_path, plant, cycle):
    assert import_cycles(_tree(tmp_path, plant)) == [cycle]


def test_a_function_over_the_budget_is_reported_and_one_at_it_is_not(tmp_path):
    short = "".join(_function(f"short{i}", 3) for i in range(20))  # keeps the 90th percentile low
    long = _function("at_budget", 60) + _function("too_long", 70)
    root = _tree(tmp_path, {"qvlm/quant.py": long, "qvlm/search.py": short})
    assert size_findings(root) == ["qvlm/quant.py:70 too_long: 70 lines (budget 60)"]


def test_a_90th_percentile_over_the_budget_is_reported(tmp_path):
    root = _tree(tmp_path, {"qvlm/search.py": "".join(_function(f"f{i}", 30) for i in range(4))})
    assert size_findings(root) == ["90th percentile of function lengths is 30 lines (budget: under 30)"]
    assert size_findings(root, p90_below=31) == []


@pytest.mark.parametrize("map_text,findings", [
    (MAP.replace("  search.py      the search\n", ""), ["README.md map: qvlm/search.py is missing"]),
    (MAP + "qvlm/\n  packing.py     gone\n", ["README.md map: qvlm/packing.py does not exist"]),
    (MAP + "qvlm/\n  quant.py       again\n", ["README.md map: qvlm/quant.py is listed 2 times"]),
    (MAP.replace("    page.py", "  page.py"), ["README.md map: cluster/report/page.py is missing",
                                                 "README.md map: cluster/page.py does not exist"]),
    (MAP.replace("  quant.py       quantizers\n  search.py      the search\n", "  quant.py, search.py  the method\n"),
     ["README.md map: 'qvlm/quant.py,' is not one module's file name (one module per line)",
      "README.md map: qvlm/quant.py is missing", "README.md map: qvlm/search.py is missing"]),
], ids=["missing", "not-there", "twice", "wrong-folder", "two-on-a-line"])
def test_readme_map_faults_are_reported(tmp_path, map_text, findings):
    assert map_findings(_tree(tmp_path, map_text=map_text)) == findings


def test_a_readme_without_the_map_is_reported(tmp_path):
    root = _tree(tmp_path)
    (root / "README.md").write_text("# tiny\n\n## Map\n\n```\nqvlm/\n```\n")
    assert map_findings(root) == ["README.md: no ``` block under '## Map of the tree'"]
