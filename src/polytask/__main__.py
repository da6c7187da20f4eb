"""``python -m polytask`` is the ``polytask`` command."""

from .cli import main

main()
