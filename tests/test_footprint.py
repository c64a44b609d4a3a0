"""What an idle default process leaves unloaded: memory is paid in every Pod (docs/performance.md, "Memory
of an idle process"). Each library here is imported where it is first used; an import moved back to the
top of a module would cost every default process its memory without any test failing but this one."""

import json
import subprocess
import sys

from processes import BASE_ENV

# Builds the service the way twistd does (the plugin's options, then makeService) and lists what is loaded.
_LOADED = """
import json, sys
from twisted.plugins.ambassador_service import ambassador
options = ambassador.options()
options.parseOptions(sys.argv[1:])
ambassador.makeService(options)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

OPTIONAL = {"yaml", "txredisapi", "opentelemetry"}  # --config, --cache redis://..., OTEL_* variables


def loaded(tmp_path, *args: str) -> set[str]:
    """The top-level packages a process built with ``args`` has imported."""
    done = subprocess.run([sys.executable, "-c", _LOADED, "--port", "0", "--admin-port", "none", *args],
                          env={**BASE_ENV, "TMDB_API_KEY": "test-api-key"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_a_default_process_loads_neither_yaml_nor_the_redis_client_nor_the_tracing_sdk(tmp_path):
    assert loaded(tmp_path) & OPTIONAL == set()


def test_a_config_file_loads_yaml(tmp_path):
    """The check above can see a library imported on first use."""
    (tmp_path / "ambassador.yaml").write_text("adapters:\n  tmdb:\n    type: tmdb\n")
    assert "yaml" in loaded(tmp_path, "--config", str(tmp_path / "ambassador.yaml"))
