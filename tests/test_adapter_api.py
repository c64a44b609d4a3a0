"""ambassador.adapter is the one module adapters import the core from; ambassador.testing the one their tests use."""

import ast
from pathlib import Path

import ambassador.adapter
from ambassador import exchange, interfaces, problems
from test_guide import guide_files

ROOT = Path(__file__).parent.parent
PUBLIC, TESTING = "ambassador.adapter", "ambassador.testing"


def test_the_public_names_are_the_cores_own_objects():
    assert len(set(ambassador.adapter.__all__)) == len(ambassador.adapter.__all__)
    for name in ambassador.adapter.__all__:
        assert hasattr(ambassador.adapter, name), name
    # The same objects, not copies: what an adapter builds is what the core checks for.
    assert ambassador.adapter.Route is exchange.Route
    assert ambassador.adapter.IExternalAdapter is interfaces.IExternalAdapter
    assert ambassador.adapter.Problem is problems.Problem


def adapter_sources() -> dict[str, str]:
    """Every adapter we ship or document: name → source."""
    sources = {f"docs/writing-an-adapter.md: {path}": code for path, code in guide_files().items()
               if path.endswith(".py") and not path.endswith("setup.py")}
    omdb = ROOT / "plugins" / "ambassador-omdb"
    paths = [p for p in omdb.rglob("*.py") if "build" not in p.relative_to(omdb).parts and p.name != "setup.py"]
    paths += [*(ROOT / "ambassador" / "adapters").glob("*.py"), ROOT / "twisted" / "plugins" / "ambassador_tmdb.py"]
    sources.update({str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths})
    return sources


def core_imports(source: str) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every import of an ``ambassador`` module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ambassador":
            found.append((node.module, tuple(alias.name for alias in node.names)))
        elif isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names if alias.name.split(".")[0] == "ambassador"]
    return found


def test_adapters_import_the_core_only_from_the_public_module():
    sources = adapter_sources()
    assert len(sources) >= 10  # the guide's four, OMDb's four, the built-in adapters and the TMDB dropin
    seen = set()
    for where, source in sources.items():
        for module, names in core_imports(source):
            seen.add(module)
            if module.startswith("ambassador.adapters."):
                continue  # a built-in adapter's own package (the TMDB dropin imports its plugin)
            testing_code = "/tests/" in where or where.endswith("testing.py")
            assert module == PUBLIC or (module == TESTING and testing_code), f"{where} imports {module}"
            if module == PUBLIC:
                unlisted = set(names) - set(ambassador.adapter.__all__)
                assert not unlisted, f"{where} imports {sorted(unlisted)}, not in ambassador.adapter.__all__"
    assert {PUBLIC, TESTING} <= seen
