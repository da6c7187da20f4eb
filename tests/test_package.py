import subprocess
import sys

import polytask


def test_all_is_complete_and_sorted():
    public = {
        name
        for name in dir(polytask)
        if not name.startswith("_") and getattr(getattr(polytask, name), "__module__", "").startswith("polytask")
    }
    assert public - set(polytask.__all__) == set()
    assert sorted(polytask.__all__, key=str.lower) == sorted(polytask.__all__, key=str.lower)
    for name in polytask.__all__:
        if name != "TransformersBackend":
            assert hasattr(polytask, name), name


def test_import_polytask_does_not_import_torch():
    code = "import sys, polytask, polytask.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
