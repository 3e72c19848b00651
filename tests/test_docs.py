"""The docs are current: every relative link resolves; every Python block parses and its
imports run, and the blocks marked `<!-- docs: run -->` run whole; every shell block names
commands, modules, configs and files that exist; the generated reference pages equal a
fresh generation. (The `<!-- own-model: ... -->` blocks run whole in
tests/test_foreign_models.py, with the model they need.)"""
import ast
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "bench/README.md"] + [
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                recursive=True)])
BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```(\w*)\n(.*?)^```", re.S | re.M)


def _read(page):
  with open(os.path.join(REPO, page)) as f:
    return f.read()


def _blocks(kind):
  for page in PAGES:
    for m in BLOCK.finditer(_read(page)):
      if m.group(2) == kind:
        line = _read(page)[:m.start(3)].count("\n") + 1
        yield pytest.param(page, m.group(1) or "", m.group(3), id=f"{page}:{line}")


def test_every_relative_link_resolves():
  bad = []
  for page in PAGES:
    text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), target.split("#")[0]))
      if not os.path.exists(path):
        bad.append(f"{page}: ({target})")
  assert not bad, "links to nothing:\n" + "\n".join(bad)


def test_docs_index_links_every_page():
  linked = set(re.findall(r"\]\(([^)#\s]+)", _read("docs/README.md")))
  missing = [p for p in PAGES if p.startswith("docs/") and p != "docs/README.md"
             and os.path.relpath(p, "docs") not in linked]
  assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.parametrize("page,marker,code", list(_blocks("python")))
def test_python_block_parses_and_imports(page, marker, code, tmp_path):
  tree = ast.parse(code, filename=page)  # a syntax error fails here
  if "own-model" in marker:
    return  # run whole, with its model, by tests/test_foreign_models.py
  if "docs: run" in marker:  # run whole, in a process of its own (it may register things)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, f"{page}:\n{textwrap.indent(code, '  ')}\n{r.stderr[-2000:]}"
    return
  # a fragment (it names a config, a directory, ...): its imports must hold, and every
  # attribute it takes of an imported name must exist (pruning.Ramp, step.build)
  imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
  names = {(a.asname or a.name).split(".")[0] for n in imports for a in n.names}
  attrs = sorted({(n.value.id, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id in names})
  scope = {}
  exec(compile(ast.Module(imports, []), page, "exec"), scope)  # imports only: no side effects
  missing = [f"{v}.{a}" for v, a in attrs if not hasattr(scope[v], a)]
  assert not missing, f"{page}: {missing} do not exist"
  # a module named as a string (config.model_module = "mmjax.pretrained.vit") exists
  for name in re.findall(r"""["']((?:mmjax|experiments)(?:\.\w+)+)(?::\w+)?["']""", code):
    assert importlib.util.find_spec(name) is not None, (page, name)


def _launch_commands():
  with open(os.path.join(REPO, "launch.sh")) as f:
    return set(re.findall(r"^\s*([\w|-]+)\)", f.read(), re.M))


def _command_blocks():
  yield from _blocks("bash")
  for p in _blocks(""):  # unlabelled: the ones that are commands
    page, marker, code = p.values
    if re.match(r"\s*(\.venv/bin/|python|\./launch\.sh)", code):
      yield p


@pytest.mark.parametrize("page,marker,code", list(_command_blocks()))
def test_shell_block_names_what_exists(page, marker, code):
  commands = {c for group in _launch_commands() for c in group.split("|")}
  bad = []
  for line in code.replace("\\\n", " ").splitlines():
    line = line.split(" #")[0].strip()
    if not line or line.startswith("#"):
      continue
    words = shlex.split(line, posix=True)
    for i, w in enumerate(words):
      if w.endswith("launch.sh") and i + 1 < len(words) and words[i + 1] not in commands:
        bad.append(f"./launch.sh {words[i + 1]}: not a launch.sh command ({sorted(commands)})")
      if w == "-m" and i + 1 < len(words) and words[i + 1] != "pip":
        if importlib.util.find_spec(words[i + 1]) is None:
          bad.append(f"python -m {words[i + 1]}: no such module")
      if w.startswith("--config="):
        path = w.split("=", 1)[1].split(":")[0]
        if not os.path.exists(os.path.join(REPO, path)):
          bad.append(f"{w}: no config file {path}")
      if re.fullmatch(r"(bench|experiments|mmjax|tests|docs|notebooks)/[\w/.]+\.(py|sh|md)", w):
        if not os.path.exists(os.path.join(REPO, w)):
          bad.append(f"{w}: no such file")
  assert not bad, f"{page}:\n" + "\n".join(bad)


def _exists(dotted: str) -> bool:
  """A module, or an attribute of one (mmjax.compress.hooks.call)."""
  import importlib
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    mod = ".".join(parts[:i])
    try:
      if importlib.util.find_spec(mod) is None:
        continue
    except ModuleNotFoundError:
      continue
    obj = importlib.import_module(mod)
    for a in parts[i:]:
      if not hasattr(obj, a):
        return False
      obj = getattr(obj, a)
    return True
  return False


def test_names_and_paths_in_the_prose_exist():
  """`mmjax.x.y` names and repo paths (mmjax/..., docs/..., bench/...) in inline code."""
  bad = []
  for page in PAGES:
    text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", text):
      for name in re.findall(r"(?<![\w/.])(mmjax(?:\.\w+)+)", span):
        if not _exists(name):
          bad.append(f"{page}: {name}")
      for path in re.findall(r"(?<![\w/.])((?:mmjax|experiments|bench|tests|docs|notebooks)"
                             r"/[\w/.-]*\w)", span):
        if not re.search(r"[<*{]", span) and not os.path.exists(os.path.join(REPO, path)):
          bad.append(f"{page}: {path}")
  assert not bad, "named in the docs but not in the code:\n" + "\n".join(sorted(set(bad)))


def test_generated_reference_is_current(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mmjax.cli.reference", f"--out={tmp_path}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  stale = []
  for name in sorted(os.listdir(tmp_path)):
    committed = os.path.join(REPO, "docs", "reference", name)
    fresh = (tmp_path / name).read_text()
    if not os.path.exists(committed) or _read(os.path.relpath(committed, REPO)) != fresh:
      stale.append(name)
  assert not stale, (f"docs/reference/{stale} are stale: python -m mmjax.cli.reference "
                     "--out=docs/reference")
