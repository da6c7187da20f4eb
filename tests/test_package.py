import subprocess
import sys

import polytask


def test_all_is_complete_sorted_and_resolves():
    public = {
        name
        for name in dir(polytask)
        if not name.startswith("_") and getattr(getattr(polytask, name), "__module__", "").startswith("polytask")
    }
    assert public - set(polytask.__all__) == set()  # nothing public is left out
    assert polytask.__all__ == sorted(set(polytask.__all__))  # sorted, no name twice (ruff's RUF022 order)
    for name in polytask.__all__:
        if name != "TransformersBackend":  # lazy: resolving it imports torch (checked below, in a subprocess)
            assert hasattr(polytask, name), name


def test_import_polytask_imports_no_local_extra_until_the_local_backend_is_used():
    code = (
        "import sys, polytask, polytask.cli, polytask.backends, polytask.local;"
        "bad = [m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
