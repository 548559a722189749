"""The documentation site builds strictly, the tutorial notebook runs, the README points at both."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})


def test_docs_site_builds_strictly(tmp_path):
    r = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # the API reference is generated from the docstrings
    assert "contrastive_loss" in api and "queries of this process" in api and "load_backbone" in api


def test_a_broken_link_fails_the_docs_build(tmp_path):
    """The strict build is a real check: a copy of the docs with one dead link does not build."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\nSee [the missing page](missing.md).\n")
    cfg = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    cfg = cfg.replace("paths: [.]", f"paths: [{ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(cfg)
    r = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "missing.md" in r.stderr


def test_every_doc_page_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, page


def test_readme_links_the_docs_and_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert re.search(r"\]\(docs/index\.md\)", readme) and "mkdocs serve" in readme


@pytest.mark.slow
def test_tutorial_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "examples" / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
                            ).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "kNN top-1 by epoch" in out and "linear probe top-1" in out
    assert "['README.md', 'config.json', 'model.safetensors'] (2, 64)" in out


def test_recipes_cite_the_project_s_own_paper_notes():
    """The specification (PAPER.md) is not part of the repository: recipes cite docs/paper.md, and each
    section they cite exists there."""
    import re

    sections = set(re.findall(r"^## (§\d+) ", (ROOT / "docs" / "paper.md").read_text(), flags=re.M))
    cited = set()
    for recipe in (ROOT / "mocov3" / "recipes").rglob("*.yaml"):
        text = recipe.read_text()
        assert "PAPER.md" not in text, recipe
        cited |= set(re.findall(r"docs/paper\.md (§\d+)", text))
    assert cited and cited <= sections, cited - sections


def test_the_sources_throughput_table_is_the_benchmark_s():
    """docs/data.md's per-source figures are bench/data_throughput.py's JSON, rounded (not typed in)."""
    res = json.loads((ROOT / "bench" / "results" / "data_throughput_cpu.json").read_text())["sources"]
    text = (ROOT / "docs" / "data.md").read_text()
    table = text[text.index("### Sources at a glance"):text.index("## Making shards")]
    rows = {"image folder (streamed)": "image folder (streamed)", "tar shards, local": "tar shards, local",
            "tar shards at a URL": "tar shards over HTTP (127.0.0.1)",
            "Hugging Face dataset (streamed)": "Hugging Face dataset (Arrow, streamed)"}
    for label, key in rows.items():
        line = next(x for x in table.splitlines() if x.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-2:] == [str(round(res[key]["img_s_1_workers"])), str(round(res[key]["img_s_2_workers"]))]


def test_the_docs_install_the_way_that_works():
    """mocov3 is not on the package index: no page tells a user to `pip install mocov3` bare (extras from a
    checkout, `pip install -e`, are fine), and the quick start installs what `mocov3 report` needs."""
    bare = re.compile(r"pip install mocov3(?![\[\w-])")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in page.read_text().splitlines():
            assert not bare.search(line), f"{page.name}: {line.strip()}"
    assert '".[plot]"' in (ROOT / "scripts" / "quickstart.sh").read_text()


def test_example_outputs_of_the_readme_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    for folder in ("exported", "hub", "runs"):
        assert any(line.strip("/") == folder for line in ignored), folder


def test_docs_name_no_path_of_the_development_machine_and_agree_on_the_quick_start():
    """A reader has no ../shared; and the quick start's duration is one figure wherever it is given."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.py"))]
    for page in pages:
        assert "../shared" not in page.read_text(), page.name
    recipe = (ROOT / "mocov3" / "recipes" / "quickstart_cpu.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    minutes = re.search(r"about (\d+) minutes on 2 cores", recipe).group(1)
    assert f"about {minutes} min on 2 cores" in readme
