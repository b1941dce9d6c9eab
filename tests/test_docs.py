"""The project documents itself: references resolve inside the repository, and ``fit --help`` explains every key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALGORITHM = ROOT / "docs" / "algorithm.md"
SECTION_REF = re.compile(r"docs/algorithm\.md((?:,? ?§\d+(?:\.\d+)?(?:[–-]\d+)?)+)")
OUTSIDE_DOCS = re.compile(r"\b(?:ALGORITHM|DESIGN|REFERENCE_RESULTS)\.md\b")
# the option groups this project defines (trainer.* are Lightning's own, documented by Lightning)
OWN_GROUPS = ("model", "data", "eval", "checkpoint", "monitor", "mlflow")
OWN_CLASSES = ("model.actor dime_lightning.DiffusionActor", "model.actor dime_lightning.gaussian.TanhGaussianActor",
               "model.critic dime_lightning.DistributionalCritic", "model.temperature dime_lightning.Temperature")


def repository_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if name.endswith((".py", ".md", ".yaml", ".ipynb", ".sh", ".yml"))
            and (ROOT / name).is_file()]


def algorithm_sections() -> set[str]:
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", ALGORITHM.read_text(encoding="utf-8"), flags=re.M)
    return set(headings)


def cited_sections(text: str) -> list[str]:
    """Every section number cited as ``docs/algorithm.md §a, §b.c`` (a range ``§2.2 3–5`` cites §2.2)."""
    return [number for group in SECTION_REF.findall(text) for number in re.findall(r"§(\d+(?:\.\d+)?)", group)]


def test_cited_sections_parser() -> None:
    assert cited_sections("see docs/algorithm.md §1.7, §2.2 and docs/algorithm.md §3") == ["1.7", "2.2", "3"]
    assert cited_sections("docs/algorithm.md §8 items 1–6") == ["8"]


def test_the_algorithm_document_has_the_cited_structure() -> None:
    sections = algorithm_sections()
    assert {"1", "1.1", "1.7", "2", "2.1", "2.2", "3", "4", "5", "6", "7", "8"} <= sections, sorted(sections)


def test_every_section_reference_resolves_inside_the_repository() -> None:
    sections = algorithm_sections()
    dangling, outside = [], []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        dangling += [f"{path.relative_to(ROOT)}: §{n}" for n in cited_sections(text) if n not in sections]
        outside += [f"{path.relative_to(ROOT)}: {m}" for m in OUTSIDE_DOCS.findall(text)]
    assert not dangling, f"references to sections docs/algorithm.md does not have: {dangling}"
    assert not outside, f"references to documents outside the repository: {outside}"


def undocumented_options(help_text: str, prefix: str) -> list[str]:
    """Options ``--<prefix>.x`` whose help is only jsonargparse's '(type: …)' line (no description)."""
    missing = []
    blocks = re.split(r"\n  (?=--)", help_text)
    for block in blocks:
        match = re.match(rf"(--{re.escape(prefix)}\.[\w.]+)(?: [A-Z_\[\]{{}},.|a-z-]*)?\s+(.*)", block, flags=re.S)
        if not match or match.group(1).endswith(".help") or " CONFIG" in block.split("\n")[0]:
            continue
        description = " ".join(match.group(2).split())
        if description.startswith("(type:") or not description:
            missing.append(match.group(1))
    return missing


def test_undocumented_options_parser_finds_a_bare_option() -> None:
    text = ("\n  --data.env_id ENV_ID  a Gymnasium id. (type: str, default: x)"
            "\n  --data.batch_size BATCH_SIZE\n                        (type: int, default: 256)")
    assert undocumented_options(text, "data") == ["--data.batch_size"]


def run_help(*extra: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dime_lightning.fit", *extra], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def fit_help() -> str:
    return run_help("--help")


@pytest.mark.parametrize("group", OWN_GROUPS)
def test_fit_help_documents_every_key_of_the_projects_groups(fit_help: str, group: str) -> None:
    assert f"--{group}." in fit_help
    assert undocumented_options(fit_help, group) == []


def test_fit_help_has_no_optimizer_keys_the_module_would_ignore(fit_help: str) -> None:
    assert "--optimizer" not in fit_help and "--lr_scheduler" not in fit_help


@pytest.mark.parametrize("spec", OWN_CLASSES, ids=lambda s: s.split(".")[-1])
def test_class_help_documents_every_init_arg(spec: str) -> None:
    key, class_path = spec.split()
    text = run_help(f"--{key}.help", class_path)
    assert f"--{key}." in text
    assert undocumented_options(text, key) == []


def test_every_test_the_algorithm_document_cites_exists() -> None:
    section8 = ALGORITHM.read_text(encoding="utf-8").split("## 8. Tests", 1)[1]
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined.add(path.stem)
        defined.update(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    cited = re.findall(r"\b(test_\w+?)(\*|\.py|\b)", section8)
    assert len(cited) > 20
    missing = [name + tail for name, tail in cited
               if not (any(d.startswith(name) for d in defined) if tail == "*" else name in defined)]
    assert not missing, f"docs/algorithm.md §8 cites tests that do not exist: {missing}"
